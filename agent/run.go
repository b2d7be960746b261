package agent

import (
	"context"
	"errors"
	"fmt"
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
	if p := e.cfg.Metrics.Textfile; p != "" {
		e.m.Changed()
		go e.m.KeepTextfile(ctx, e.path(p), e.log)
	}
	if addr := e.cfg.Metrics.Listen; addr != "" {
		go func() {
			if err := e.m.Serve(ctx, addr, e.healthy, e.log); err != nil {
				e.log.Error("metrics listener failed; the agent goes on without it", zap.Error(err))
			}
		}()
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
// ctx ends or a reload. Its loop is the agent's heartbeat: every poll it
// checks the host name and IMDS's notices; the bootstrap, chef-client runs,
// a late registration and deregistration run beside it.
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
	registered := make(chan bootDone, 1)
	stopSchedule := func() {}
	startSchedule := func(r Result) {
		if r.chef == nil {
			return
		}
		sctx, stop := context.WithCancel(sub)
		stopSchedule = stop
		wg.Go(func() { e.schedule(sctx, r) })
	}

	var (
		res         *Result
		log         = e.log
		drift       repeatLog
		notices     noticeWatch
		registering bool
	)
	poll := e.cfg.IMDS.PollInterval.D()
	pollTimer := e.clock.After(poll)
	// With a watchdog, the loop also turns at its pace, so that a long poll
	// interval does not starve it.
	var beat <-chan time.Time
	every, watched := systemd.WatchdogInterval()
	if watched {
		beat = e.clock.After(every)
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
			log = e.log.With(zap.String("instance_id", res.Identity.InstanceID))
			drift = repeatLog{log: log, msg: "hostname check failed", recovered: "hostname check works again"}
			notices.failures = repeatLog{log: log, msg: "could not read IMDS notices", recovered: "IMDS notices readable again"}
			status := e.afterBoot(*res)
			e.notifier.Ready(status)
			log.Info("bootstrapped: READY", zap.String("status", status))
			if st := e.snapshot(); res.Warmed == "" && st.Deregistration == nil {
				startSchedule(*res)
			}
		case b := <-registered:
			registering = false
			if b.err != nil {
				e.fail(b.err, "at the next poll")
				continue
			}
			res = &b.res
			e.idle(*res)
			startSchedule(*res)
		case <-beat:
			beat = e.clock.After(every)
		case <-pollTimer:
			pollTimer = e.clock.After(poll)
			if res == nil {
				continue
			}
			e.checkDrift(sub, *res, &drift)
			n, ok := e.checkNotices(sub, log, &notices)
			switch {
			case !ok:
			case n.Terminating() && !notices.terminating:
				notices.terminating = true
				stopSchedule()
				r := *res
				wg.Go(func() { e.terminate(sub, log, r, n) })
			case res.Warmed != "" && !registering && n.LifecycleState == "InService":
				registering = true
				r := *res
				wg.Go(func() {
					r, err := e.registerInService(sub, log, r)
					registered <- bootDone{r, err}
				})
			}
		}
	}
}

// afterBoot sets the phase a finished bootstrap leaves the agent in, and
// returns its status line.
func (e *Engine) afterBoot(res Result) string {
	switch st := e.snapshot(); {
	case res.Warmed != "":
		status := "warm pool (" + res.Warmed + "): named " + res.Hostname.String() + "; registration waits until the instance goes into service"
		e.transition(PhaseWarmPool, status)
		return status
	case st.Deregistration != nil && len(st.Deregistration.LeftBehind) == 0:
		status := "deregistered: node and client " + st.NodeName + " deleted; the instance is terminating"
		e.transition(PhaseDeregistered, status)
		return status
	default:
		e.idle(res)
		return e.snapshot().Status
	}
}

// registerInService registers a warm-pool instance once Auto Scaling puts
// it into service.
func (e *Engine) registerInService(ctx context.Context, log *zap.Logger, res Result) (Result, error) {
	log.Info("the instance left the warm pool and is in service: registering", zap.String("was", res.Warmed))
	p := res.chef
	e.transition(PhaseRegistering, fmt.Sprintf("registering node %s with %s", p.nodeName, res.Config.Chef.ServerURL))
	reg, err := e.register(ctx, log, res.Config, p)
	if err != nil {
		return res, err
	}
	now := e.clock.Now()
	e.update(func(s *State) {
		s.NodeName, s.ClientName, s.RegisteredAt = p.nodeName, p.nodeName, &now
		s.Bootstrapped = true
	})
	res.Registered, res.Warmed = reg, ""
	return res, nil
}

// bootstrap runs a pass until it succeeds, fails on bad input, or ctx ends.
func (e *Engine) bootstrap(ctx context.Context) (Result, error) {
	var res Result
	b := backoff.New(e.retryPolicy(bootstrapRetry), e.clock)
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
		e.m.DriftCorrections.WithLabelValues(c.What).Inc()
		e.m.Changed()
	}
	switch {
	case err == nil:
		drift.ok()
	case ctx.Err() == nil:
		drift.fail(err)
	}
}

// healthy reports whether the main loop turned lately, for /healthz: it
// turns at least every poll interval.
func (e *Engine) healthy() bool {
	return time.Since(time.Unix(0, e.beat.Load())) < 3*e.cfg.IMDS.PollInterval.D()+time.Second
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
