package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/metrics"
	"github.com/bootagent/bootagent/systemd"
)

// finalRunReserve is the part of a termination notice kept for
// deregistration when a final chef-client run goes first, and the least a
// final run is worth starting with.
const finalRunReserve = 30 * time.Second

// noticeWatch follows IMDS's notices from poll to poll.
type noticeWatch struct {
	last        imds.Notices
	read        bool
	failures    repeatLog
	terminating bool
}

// checkNotices reads IMDS's notices, logs each change once, keeps them in
// the state, and reports what they ask of the agent.
func (e *Engine) checkNotices(ctx context.Context, log *zap.Logger, w *noticeWatch) (imds.Notices, bool) {
	n, err := e.md.Notices(ctx)
	if err != nil {
		if ctx.Err() == nil {
			w.failures.fail(err)
		}
		return w.last, false
	}
	w.failures.ok()
	if w.read && noticesEqual(n, w.last) {
		return n, true
	}
	e.noticeChanges(log, w.last, n)
	w.last, w.read = n, true
	e.update(func(s *State) { s.Notices = &n })
	return n, true
}

func noticesEqual(a, b imds.Notices) bool {
	return a.LifecycleState == b.LifecycleState &&
		(a.Spot == nil) == (b.Spot == nil) && (a.Spot == nil || *a.Spot == *b.Spot) &&
		(a.Rebalance == nil) == (b.Rebalance == nil) && (a.Rebalance == nil || a.Rebalance.Equal(*b.Rebalance)) &&
		slices.Equal(a.Maintenance, b.Maintenance)
}

// noticeChanges logs and counts what is new in n since old, once.
func (e *Engine) noticeChanges(log *zap.Logger, old, n imds.Notices) {
	count := func(kind string) { e.m.Notices.WithLabelValues(kind).Inc() }
	if n.LifecycleState != old.LifecycleState {
		log.Info("Auto Scaling lifecycle state", zap.String("old", old.LifecycleState), zap.String("new", n.LifecycleState))
		if n.LifecycleState == "Terminated" {
			count("autoscaling_terminated")
		}
	}
	if n.Spot != nil && (old.Spot == nil || *n.Spot != *old.Spot) {
		log.Warn("spot interruption notice", zap.String("action", n.Spot.Action), zap.Time("at", n.Spot.Time))
		count("spot_" + n.Spot.Action)
	}
	if n.Rebalance != nil && old.Rebalance == nil {
		log.Info("spot rebalance recommended: this instance is at elevated risk of interruption", zap.Time("at", *n.Rebalance))
		count("rebalance")
	}
	for _, m := range n.Maintenance {
		if !slices.Contains(old.Maintenance, m) {
			log.Info("scheduled maintenance event", zap.String("code", m.Code), zap.String("event_state", m.State), zap.Time("not_before", m.NotBefore))
			count("maintenance")
		}
	}
}

// terminationDeadline is when the instance goes away: a spot notice says;
// an Auto Scaling termination does not, so the agent takes the spot
// notice's two minutes.
func terminationDeadline(n imds.Notices, now time.Time) time.Time {
	if n.Spot != nil && n.Spot.Action == "terminate" {
		return n.Spot.Time
	}
	return now.Add(chef.DefaultDeregisterTimeout)
}

func terminationReason(n imds.Notices) string {
	if n.LifecycleState == "Terminated" {
		return "Auto Scaling target lifecycle state Terminated"
	}
	return "spot interruption notice: terminate at " + n.Spot.Time.Format(time.RFC3339)
}

// terminate does what a termination notice asks: an optional last
// chef-client run, then the removal of the node and client from the Chef
// server, retried until the notice's deadline.
func (e *Engine) terminate(ctx context.Context, log *zap.Logger, res Result, n imds.Notices) {
	now := e.clock.Now()
	deadline := terminationDeadline(n, now)
	reason := terminationReason(n)
	ch := res.Config.Chef
	st := e.snapshot()
	switch {
	case !ch.Enabled() || st.RegisteredAt == nil:
		log.Info("the instance is terminating; it was never registered, so nothing is left to remove", zap.String("reason", reason))
		e.transition(PhaseTerminating, "terminating ("+reason+"); nothing registered")
		return
	case !ch.DeregisterOnTermination:
		log.Warn("the instance is terminating; chef.deregister_on_termination is off, so its node and client stay on the Chef server",
			zap.String("reason", reason), zap.String("node_name", st.NodeName))
		e.transition(PhaseTerminating, "terminating ("+reason+"); node "+st.NodeName+" kept (deregistration off)")
		return
	}
	log = log.With(zap.String("node_name", st.NodeName))
	log.Warn("the instance is terminating: deregistering from the Chef server", zap.String("reason", reason), zap.Time("deadline", deadline))
	e.transition(PhaseTerminating, fmt.Sprintf("terminating (%s): deregistering node %s by %s", reason, st.NodeName, deadline.Format(time.RFC3339)))
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	if ch.FinalRun {
		if left := deadline.Sub(e.clock.Now()) - finalRunReserve; left < finalRunReserve {
			log.Warn("no time for a final chef-client run before deregistering", zap.Duration("left", left+finalRunReserve))
		} else if _, err := e.runChef(ctx, res, false, min(left, ch.RunTimeout.D())); err != nil {
			log.Warn("the final chef-client run did not happen", zap.Error(err))
		}
	}
	d, err := e.deregister(ctx, log, res.Config, st.NodeName, reason)
	if err != nil {
		e.setPhase(PhaseFailed, fmt.Sprintf("terminating: deregistration incomplete, left on the Chef server: %s", strings.Join(d.LeftBehind, ", ")), err.Error())
		return
	}
	e.transition(PhaseDeregistered, fmt.Sprintf("deregistered: node and client %s deleted; the instance is terminating", st.NodeName))
}

// deregister removes the node and client and records the outcome,
// telling an operator what was left behind if it failed.
func (e *Engine) deregister(ctx context.Context, log *zap.Logger, cfg config.Config, name, reason string) (Deregistration, error) {
	r := e.registrar(log, cfg)
	r.MaxAttempts = 0 // Until the deadline.
	d, err := r.Deregister(ctx, name, e.path(cfg.Chef.ClientKey))
	rec := Deregistration{At: e.clock.Now().UTC(), Reason: reason, Deregistered: d, LeftBehind: d.LeftBehind(name)}
	outcome := "deleted"
	if err != nil {
		outcome = "incomplete"
	}
	e.m.Deregistrations.WithLabelValues(outcome).Inc()
	if err != nil {
		rec.Error = err.Error()
		log.Error("deregistration incomplete: remove what is left by hand",
			zap.Strings("left_behind", rec.LeftBehind), zap.String("fix", fmt.Sprintf("knife node delete %s -y; knife client delete %s -y", name, name)), zap.Error(err))
	} else {
		log.Info("deregistered: node and client deleted from the Chef server", zap.Int("retries", d.Retries))
	}
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("the termination deadline passed before the Chef server answered: %w", err)
		rec.Error = err.Error()
	}
	e.update(func(s *State) { s.Deregistration = &rec })
	return rec, err
}

// Deregister removes this instance's node and client from the Chef server
// by hand (`bootagent deregister`, for shutdown hooks and lifecycle
// scripts), trying until ctx ends. It records the outcome in the state
// when no agent is running; beside a running agent it only deletes.
func Deregister(ctx context.Context, root string, cfg config.Config, log *zap.Logger) (Deregistration, error) {
	// Only the state and the Chef server are needed: no IMDS, no names.
	e := &Engine{cfg: cfg, root: root, log: log, clock: backoff.RealClock{}, notifier: systemd.NewNotifier(log), m: metrics.New()}
	unlock, lockErr := e.lockAgent()
	switch {
	case lockErr == nil:
		defer unlock()
	case !errors.Is(lockErr, errAgentRunning):
		return Deregistration{}, lockErr
	}
	st, err := loadState(root)
	if err != nil {
		return Deregistration{}, err
	}
	if st.NodeName == "" || st.RegisteredAt == nil {
		return Deregistration{}, errors.New("this instance is not registered (no node in /var/lib/bootagent/state.json): nothing to remove")
	}
	if d := st.Deregistration; d != nil && d.NodeDeleted && d.ClientDeleted {
		log.Info("already deregistered", zap.String("node_name", st.NodeName), zap.Time("at", d.At))
		return *d, nil
	}
	log = log.With(zap.String("node_name", st.NodeName))
	if lockErr != nil {
		// The running agent owns the state file; only delete.
		log.Info("an agent is running: deregistering without recording it in its state")
		r := e.registrar(log, cfg)
		r.MaxAttempts = 0
		d, err := r.Deregister(ctx, st.NodeName, e.path(cfg.Chef.ClientKey))
		return Deregistration{At: e.clock.Now().UTC(), Reason: "bootagent deregister", Deregistered: d, LeftBehind: d.LeftBehind(st.NodeName)}, err
	}
	return e.deregister(ctx, log, cfg, st.NodeName, "bootagent deregister")
}
