package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/metrics"
)

func noticesEqual(a, b imds.Notices) bool {
	return a.LifecycleState == b.LifecycleState &&
		(a.Spot == nil) == (b.Spot == nil) && (a.Spot == nil || *a.Spot == *b.Spot) &&
		(a.Rebalance == nil) == (b.Rebalance == nil) && (a.Rebalance == nil || a.Rebalance.Equal(*b.Rebalance)) &&
		slices.Equal(a.Maintenance, b.Maintenance)
}

// noticeChanges logs and counts what is new in n since old, once.
func noticeChanges(log *zap.Logger, m *metrics.Metrics, old, n imds.Notices) {
	count := func(kind string) { m.Notices.WithLabelValues(kind).Inc() }
	if n.LifecycleState != old.LifecycleState {
		log.Info("Auto Scaling lifecycle state", zap.String("old", old.LifecycleState), zap.String("new", n.LifecycleState))
		if (imds.Notices{LifecycleState: n.LifecycleState}).Terminating() {
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
	for _, e := range n.Maintenance {
		if !slices.Contains(old.Maintenance, e) {
			log.Info("scheduled maintenance event", zap.String("code", e.Code), zap.String("event_state", e.State), zap.Time("not_before", e.NotBefore))
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
	if n.Spot != nil && n.Spot.Action == "terminate" {
		return "spot interruption notice: terminate at " + n.Spot.Time.Format(time.RFC3339)
	}
	return "Auto Scaling target lifecycle state " + n.LifecycleState
}

// deregistrationRecord is what the state keeps of a deregistration of
// name that ended as ev says.
func deregistrationRecord(now time.Time, name, reason string, ev evDeregistered) Deregistration {
	rec := Deregistration{At: now.UTC(), Reason: reason, Deregistered: ev.d, LeftBehind: ev.d.LeftBehind(name)}
	for _, former := range ev.formerLeft {
		rec.LeftBehind = append(rec.LeftBehind, "node "+former, "client "+former)
	}
	if ev.err != nil {
		rec.Refused = errors.Is(ev.err, chef.ErrDeleteRefused) || errors.Is(ev.err, chef.ErrKeyRefused)
		rec.Error = ev.err.Error()
	}
	return rec
}

// deregisterAll is the deregistration worker: the former nodes, then the
// current one (when not gone already), each until the deadline. A request
// that is still failing when the deadline leaves no time for another says
// so in its error.
func deregisterAll(ctx context.Context, root string, clock backoff.Clock, policy backoff.Policy, a actDeregister, observe func(*chef.APIError), nodeDeleted func()) evDeregistered {
	var ev evDeregistered
	var errs []error
	within := func(err error) error {
		var api *chef.APIError
		if errors.As(err, &api) && api.Retryable() {
			return fmt.Errorf("the deadline (%s) left no time to ask the Chef server again: %w", a.deadline.UTC().Format(time.RFC3339), err)
		}
		return err
	}
	for _, name := range a.former {
		if _, err := deregister(ctx, a.cfg, root, a.log, clock, policy, chef.Leaving{Name: name, KeyPath: a.cfg.Chef.ClientKey}, a.deadline, observe); err != nil {
			ev.formerLeft = append(ev.formerLeft, name)
			errs = append(errs, within(err))
		}
	}
	ev.d = chef.Deregistered{NodeDeleted: true, ClientDeleted: true}
	if a.current != nil {
		l := *a.current
		l.OnNodeDeleted = nodeDeleted
		d, err := deregister(ctx, a.cfg, root, a.log, clock, policy, l, a.deadline, observe)
		ev.d = d
		if err != nil {
			errs = append(errs, within(err))
		}
	}
	ev.err = errors.Join(errs...)
	return ev
}

// logDeregistration tells an operator how a deregistration ended, and
// what to remove by hand if it left something.
func logDeregistration(log *zap.Logger, m *metrics.Metrics, name string, rec Deregistration) {
	log = log.With(zap.String("node_name", name))
	switch {
	case rec.Error == "" && rec.NothingThere:
		m.Deregistrations.WithLabelValues("deleted").Inc()
		log.Info("deregistered: the Chef server never held this node, so nothing was deleted")
		return
	case rec.Error == "":
		m.Deregistrations.WithLabelValues("deleted").Inc()
		log.Info("deregistered: node and client deleted from the Chef server", zap.Int("retries", rec.Retries))
		return
	}
	m.Deregistrations.WithLabelValues("incomplete").Inc()
	log.Error("deregistration incomplete: remove what is left by hand",
		zap.Strings("left_behind", rec.LeftBehind), zap.String("fix", fmt.Sprintf("knife node delete %s -y; knife client delete %s -y", name, name)),
		zap.String("error", rec.Error))
}

// deregister removes the node and client l names from the Chef server cfg
// names, for the agent under root, retrying until deadline: the deletions
// of a termination (the machine's worker) and of `bootagent deregister`.
// l.KeyPath is taken inside root. observe, when set, is told of each
// failed request.
func deregister(ctx context.Context, cfg config.Config, root string, log *zap.Logger, clock backoff.Clock, policy backoff.Policy, l chef.Leaving, deadline time.Time, observe func(*chef.APIError)) (chef.Deregistered, error) {
	r := registrar(cfg, root, log.With(zap.String("node_name", l.Name)), clock, policy)
	r.Deadline = deadline
	r.Observe = observe
	return r.Deregister(ctx, l)
}

// Deregister removes this instance's node and client from the Chef server
// by hand (`bootagent deregister`, for shutdown hooks and lifecycle
// scripts), retrying until ctx's deadline. It records the outcome in the
// state when no agent is running; beside a running agent it only deletes,
// since the running agent owns the state.
func Deregister(ctx context.Context, root string, cfg config.Config, log *zap.Logger) (Deregistration, error) {
	const reason = "bootagent deregister"
	unlock, lockErr := lockAgent(root)
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
	if d := st.Deregistration; d.Complete() {
		log.Info("already deregistered", zap.String("node_name", st.NodeName), zap.Time("at", d.At))
		return *d, nil
	}
	clock := backoff.RealClock{}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = clock.Now().Add(chef.DefaultDeregisterTimeout)
	}
	d := st.Deregistration
	a := actDeregister{cfg: cfg, log: log, former: st.FormerNodes, deadline: deadline}
	if d == nil || !d.NodeDeleted || !d.ClientDeleted {
		a.current = &chef.Leaving{Name: st.NodeName, KeyPath: cfg.Chef.ClientKey, Confirmed: true, NodeGone: d != nil && d.NodeDeleted}
	}
	ev := deregisterAll(ctx, root, clock, registerRetry, a, nil, nil)
	rec := deregistrationRecord(clock.Now(), st.NodeName, reason, ev)
	logDeregistration(log, metrics.New(), st.NodeName, rec)
	err = ev.err
	if lockErr != nil {
		log.Info("an agent is running: deregistered without recording it in its state")
		return rec, err
	}
	st.Deregistration, st.FormerNodes = &rec, ev.formerLeft
	if serr := (&store{root: root}).save(st, clock.Now()); serr != nil {
		log.Warn("could not save the agent state", zap.Error(serr))
	}
	return rec, err
}
