package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
)

// runGrace is how long a chef-client run that got SIGTERM (a timeout, a
// stop) has to end before SIGKILL: long enough to release chef-client's
// own lock and report, short enough not to hold a shutdown.
const runGrace = 30 * time.Second

// errRunLocked means another bootagent process is following a chef-client
// run.
var errRunLocked = errors.New("another bootagent process is running chef-client")

// splayFor spreads a fleet's runs over the splay: each instance gets its own
// fixed offset, derived from its instance ID, so that a restart of the agent
// does not reshuffle it and instances launched together do not converge
// together.
func splayFor(instanceID string, splay time.Duration) time.Duration {
	secs := uint64(splay / time.Second)
	if secs == 0 {
		return 0
	}
	h := fnv.New64a()
	h.Write([]byte(instanceID))
	return time.Duration(h.Sum64()%secs) * time.Second
}

// newRunID names a run: its start time, readable in unit names and logs,
// and a random suffix, so that two runs never share a name.
func newRunID(now time.Time) string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return now.UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(b[:])
}

// command is chef-client's command line: chef.client_command with the
// files the agent wrote, the first-boot JSON on a first run.
func (e *Engine) command(clientCommand []string, firstBoot bool) []string {
	cmd := append([]string{}, clientCommand...)
	cmd = append(cmd, "-c", e.path(clientRBPath))
	if firstBoot {
		cmd = append(cmd, "-j", e.path(firstBootPath))
	}
	return cmd
}

// TriggerRun asks the daemon for a chef-client run now (SIGUSR1). A run
// already going is not doubled.
func (e *Engine) TriggerRun() {
	select {
	case e.runNow <- struct{}{}:
	default:
	}
}

// runChef makes one chef-client run, bounded by timeout, holding the run
// lock, and records it.
func (e *Engine) runChef(ctx context.Context, res Result, firstBoot bool, timeout time.Duration) (chef.Outcome, error) {
	unlock, err := flock(e.path(runLockPath))
	if errors.Is(err, errLocked) {
		return chef.Outcome{}, errRunLocked
	}
	if err != nil {
		return chef.Outcome{}, err
	}
	defer unlock()
	spec := chef.RunSpec{
		ID:      newRunID(e.clock.Now()),
		Command: e.command(res.Config.Chef.ClientCommand, firstBoot),
		Timeout: timeout,
		Grace:   runGrace,
	}
	log := e.log.With(zap.String("instance_id", res.Identity.InstanceID), zap.String("node_name", res.NodeName), zap.String("run_id", spec.ID))
	spec.Log = log
	log.Info("chef-client run starting", zap.Bool("first_boot", firstBoot))
	e.transition(PhaseConverging, "converging: chef-client run "+spec.ID)
	out, err := e.runner.Run(ctx, spec)
	if err != nil {
		return out, fmt.Errorf("chef-client run %s: %w", spec.ID, err)
	}
	e.recordRun(out, firstBoot)
	fields := []zap.Field{zap.String("result", string(out.Result)), zap.Int("exit_code", out.ExitCode), zap.Duration("duration", out.Duration)}
	if out.Result.Failed() {
		log.Warn("chef-client run failed", append(fields, zap.String("signal", out.Signal), zap.Strings("tail", out.Tail))...)
	} else {
		log.Info("chef-client run finished", fields...)
	}
	return out, nil
}

// follower is a runner that can find and follow a run started by an
// earlier life of the agent (the systemd transient unit runner).
type follower interface {
	Running(ctx context.Context) (string, bool, error)
	Follow(ctx context.Context, id string) (chef.Outcome, error)
}

// schedule runs chef-client at once, then every chef.interval plus this
// instance's splay, until ctx ends. Runs never overlap: one that is due
// while the previous is going is skipped. A failed run is retried sooner,
// with jittered backoff capped at the interval. TriggerRun starts one now.
func (e *Engine) schedule(ctx context.Context, res Result) {
	ch := res.Config.Chef
	log := e.log.With(zap.String("instance_id", res.Identity.InstanceID), zap.String("node_name", res.NodeName))
	interval := ch.Interval.D()
	period := interval + splayFor(res.Identity.InstanceID, ch.Splay.D())
	retry := backoff.New(e.retryPolicy(backoff.Policy{Initial: min(time.Minute, interval), Max: interval, Jitter: 0.5}), e.clock)
	st := e.snapshot()
	firstBoot := !st.FirstRunDone
	done := make(chan runEnd, 1)
	running := false
	// The first run starts at once, not an interval later. After a restart
	// of the agent the schedule it had stands, so restarts do not make runs.
	due := e.clock.Now()
	if !firstBoot && st.NextRun != nil && st.NextRun.After(due) {
		due = *st.NextRun
		log.Info("keeping the chef-client schedule", zap.Time("next_run", due))
	}

	if f, ok := e.runner.(follower); ok {
		if id, found, err := f.Running(ctx); err != nil {
			log.Warn("could not look for a chef-client run left going", zap.Error(err))
		} else if found {
			log.Info("following a chef-client run that was going when the agent restarted", zap.String("run_id", id))
			running, firstBoot, due = true, false, e.clock.Now().Add(period)
			go func() {
				out, err := f.Follow(ctx, id)
				if err == nil {
					e.recordRun(out, false)
				}
				done <- runEnd{out, err}
			}()
		}
	}

	// ended plans the next run after one ends; it reports false when the
	// agent is stopping.
	ended := func(end runEnd) bool {
		running = false
		switch {
		case end.err != nil && ctx.Err() != nil:
			return false
		case end.err != nil || end.out.Result.Failed():
			due = e.clock.Now().Add(retry.Next())
			log.Info("next chef-client run soon, after the failure", zap.Time("next_run", due), zap.Error(end.err))
		default:
			retry.Reset()
			firstBoot = false
			log.Info("next chef-client run", zap.Time("next_run", due))
		}
		e.setNextRun(due)
		e.idle(res)
		return true
	}
	var timer <-chan time.Time
	var timerFor time.Time
	for {
		if timer == nil || !timerFor.Equal(due) {
			timer, timerFor = e.clock.After(due.Sub(e.clock.Now())), due
			e.setNextRun(due)
		}
		why := "scheduled"
		select {
		case <-ctx.Done():
			return
		case <-e.runNow:
			why = "requested"
		case <-timer:
			timer = nil
		case end := <-done:
			if !ended(end) {
				return
			}
			continue
		}
		// A run that ended just as the next fell due has ended: it does
		// not make the next one a skip.
		select {
		case end := <-done:
			if !ended(end) {
				return
			}
		default:
		}
		now := e.clock.Now()
		if running {
			due = now.Add(period)
			log.Warn("chef-client run skipped: the previous run is still going", zap.String("trigger", why), zap.Time("next_run", due))
			continue
		}
		running, due = true, now.Add(period)
		go func(first bool) {
			out, err := e.runChef(ctx, res, first, ch.RunTimeout.D())
			if err != nil && ctx.Err() == nil {
				log.Warn("chef-client run did not happen", zap.String("trigger", why), zap.Error(err))
			}
			done <- runEnd{out, err}
		}(firstBoot)
	}
}

// runEnd is how a scheduled run ended.
type runEnd struct {
	out chef.Outcome
	err error
}

// recordRun keeps the last run in the state. A first-boot run that did
// its job means later runs go without the first-boot JSON.
func (e *Engine) recordRun(out chef.Outcome, firstBoot bool) {
	e.m.Runs.WithLabelValues(string(out.Result)).Inc()
	e.m.LastRunTimestamp.Set(float64(out.Start.UnixNano()) / 1e9)
	e.m.LastRunDuration.Set(out.Duration.Seconds())
	e.m.LastRunExitCode.Set(float64(out.ExitCode))
	if firstBoot {
		e.milestone("first_converge")
	}
	e.update(func(s *State) {
		s.LastRun = &out
		if firstBoot && !out.Result.Failed() {
			s.FirstRunDone = true
		}
	})
}

// NextRun returns when the next chef-client run is due; zero before the
// schedule starts.
func (e *Engine) NextRun() time.Time {
	if t := e.snapshot().NextRun; t != nil {
		return *t
	}
	return time.Time{}
}

// setNextRun keeps the time of the next run in the state.
func (e *Engine) setNextRun(t time.Time) {
	e.m.NextRunTimestamp.Set(float64(t.UnixNano()) / 1e9)
	e.update(func(s *State) { s.NextRun = &t })
}

// tailText formats the end of a run's output for an error message.
func tailText(lines []string) string {
	if len(lines) == 0 {
		return ""
	}
	return "; last output:\n  " + strings.Join(lines, "\n  ")
}
