package agent

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/systemd"
)

// bootstrapRetry paces retries of a failed bootstrap pass: soon at first,
// then no more than every five minutes, so that a fleet whose IMDS or Chef
// server hiccupped recovers quickly without hammering anything.
var bootstrapRetry = backoff.Policy{Initial: time.Second, Max: 5 * time.Minute, Jitter: 0.5}

// errReload ends one life of the daemon's loop so that the next starts with
// a new configuration.
var errReload = errors.New("configuration reloaded")

// Run is the daemon. It bootstraps the instance, retrying what time can
// fix, tells systemd READY=1 once the host name is applied and the
// instance registered, then until ctx ends runs chef-client on its schedule
// and re-applies the host name whenever it drifts. Its main loop feeds the
// systemd watchdog while it turns. Invalid configuration or user-data ends
// Run with an error matching config.ErrInvalid: retrying cannot fix it.
func (e *Engine) Run(ctx context.Context) error {
	unlock, err := e.lockAgent()
	if err != nil {
		return err
	}
	defer unlock()
	defer func() {
		e.notifier.Stopping()
		e.transition(PhaseStopping, "stopping")
	}()
	if every, ok := systemd.WatchdogInterval(); ok {
		go e.watchdog(ctx, every)
	}
	for {
		err := e.serve(ctx)
		if !errors.Is(err, errReload) {
			return err
		}
	}
}

// Reload makes the daemon start over with cfg: the next pass keeps what
// is done (the state says so) and applies what changed.
func (e *Engine) Reload(cfg config.Config) {
	select {
	case <-e.reload:
	default:
	}
	e.reload <- cfg
}

// bootDone is how a bootstrap ended.
type bootDone struct {
	res Result
	err error
}

// serve runs one life of the daemon with the current configuration, until
// ctx ends or a reload.
func (e *Engine) serve(ctx context.Context) error {
	sub, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	boot := make(chan bootDone, 1)
	wg.Go(func() {
		res, err := e.bootstrap(sub)
		boot <- bootDone{res, err}
	})

	var res *Result
	var drift repeatLog
	var lastCheck time.Time
	poll := e.cfg.IMDS.PollInterval.D()
	tick := poll
	if every, ok := systemd.WatchdogInterval(); ok {
		tick = min(tick, every)
	}
	for {
		e.beat.Store(time.Now().UnixNano())
		select {
		case <-ctx.Done():
			return nil
		case cfg := <-e.reload:
			e.log.Info("configuration reloaded; starting over with it")
			e.cfg = cfg
			if e.ownMD {
				e.md = e.newMetadata(cfg)
			}
			return errReload
		case b := <-boot:
			if b.err != nil {
				if ctx.Err() != nil {
					return nil // Stopped while bootstrapping: a shutdown, not a failure.
				}
				return b.err
			}
			res = &b.res
			drift = repeatLog{log: e.log.With(zap.String("instance_id", res.Identity.InstanceID)), msg: "hostname check failed", recovered: "hostname check works again"}
			status := e.idleStatus(*res)
			e.transition(PhaseIdle, status)
			e.notifier.Ready(status)
			e.log.Info("bootstrapped: READY", zap.String("instance_id", res.Identity.InstanceID), zap.String("status", status))
			if res.chef != nil {
				r := *res
				wg.Go(func() { e.schedule(sub, r) })
			}
		case <-e.clock.After(tick):
			if res != nil && e.clock.Now().Sub(lastCheck) >= poll {
				lastCheck = e.clock.Now()
				e.checkDrift(sub, *res, &drift)
			}
		}
	}
}

// bootstrap runs a pass until it succeeds, fails on bad input, or ctx ends.
func (e *Engine) bootstrap(ctx context.Context) (Result, error) {
	var res Result
	b := backoff.New(bootstrapRetry, e.clock)
	failures := repeatLog{log: e.log, msg: "bootstrap failed; retrying", recovered: "bootstrap succeeded after failures"}
	err := b.Retry(ctx, 0, func(ctx context.Context) error {
		var err error
		res, err = e.pass(ctx)
		if errors.Is(err, config.ErrInvalid) {
			return backoff.Permanent(err)
		}
		return err
	}, func(err error, delay time.Duration) {
		failures.fail(err, zap.Duration("retry_in", delay))
		e.fail(err, "in "+delay.Round(time.Second).String())
	})
	switch {
	case err == nil:
		failures.ok()
	case ctx.Err() == nil:
		e.fail(err, "")
	}
	return res, err
}

// checkDrift re-applies the host name the pass decided, logging whatever
// had drifted.
func (e *Engine) checkDrift(ctx context.Context, res Result, drift *repeatLog) {
	if res.Hostname.IsZero() {
		return
	}
	changes, err := e.namer.Apply(ctx, res.Hostname, policy(res.Config))
	for _, c := range changes {
		drift.log.Warn("hostname drift corrected", zap.String("what", c.What), zap.String("old", c.Old), zap.String("new", c.New))
	}
	switch {
	case err == nil:
		drift.ok()
	case ctx.Err() == nil:
		drift.fail(err)
	}
}

// watchdog feeds systemd's watchdog while the main loop turns. If the loop
// stalls (a hung call, a deadlock) the feeding stops and systemd restarts
// the agent.
func (e *Engine) watchdog(ctx context.Context, every time.Duration) {
	stalled := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
		age := time.Since(time.Unix(0, e.beat.Load()))
		if age < 2*every {
			e.notifier.Watchdog()
			if stalled {
				e.log.Info("main loop turns again; feeding the watchdog")
				stalled = false
			}
			continue
		}
		if !stalled {
			e.log.Error("main loop stalled; not feeding the systemd watchdog", zap.Duration("since_last_turn", age))
			stalled = true
		}
	}
}

// repeatLog logs a failure that repeats at every poll once, and its recovery
// once.
type repeatLog struct {
	log       *zap.Logger
	msg       string
	recovered string
	last      string
}

func (r *repeatLog) fail(err error, fields ...zap.Field) {
	if err.Error() == r.last {
		return
	}
	r.last = err.Error()
	r.log.Warn(r.msg, append(fields, zap.Error(err))...)
}

func (r *repeatLog) ok() {
	if r.last == "" {
		return
	}
	r.last = ""
	r.log.Info(r.recovered)
}
