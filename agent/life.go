package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
)

// Once makes one bootstrap (IMDS, the name, registration) and the first
// chef-client run (with the first-boot JSON) when Chef is configured. Bad
// user-data or a bad setting is an error matching config.ErrInvalid, and
// then nothing has been applied. A chef-client run that fails is an error
// too, and the state then says failed.
func (e *Engine) Once(ctx context.Context) (Result, error) {
	unlock, err := lockAgent(e.root)
	if err != nil {
		return Result{}, err
	}
	defer unlock()
	end := e.live(ctx, e.cfg, e.loadState(), nil, true)
	if p := e.cfg.Metrics.Textfile; p != "" {
		if werr := e.m.WriteTextfile(e.root, p); werr != nil {
			e.log.Warn("metrics textfile not written", zap.Error(werr))
		}
	}
	return end.res, end.err
}

// Run is the daemon. It bootstraps the instance, retrying what time can
// fix, tells systemd READY=1 once the host name is applied and the
// instance registered, then until ctx ends runs chef-client on its
// schedule, re-applies the host name whenever it drifts, and deregisters
// the instance when IMDS announces its termination. Invalid configuration
// or user-data ends Run with an error matching config.ErrInvalid:
// retrying cannot fix it. A reload (Reload) starts a new life of the loop
// with the new configuration; a chef-client run going goes on through it.
func (e *Engine) Run(ctx context.Context) error {
	if ctx.Err() != nil {
		e.log.Info("stopped before it started")
		return nil
	}
	unlock, err := lockAgent(e.root)
	if err != nil {
		return err
	}
	defer unlock()
	done := make(chan struct{})
	defer close(done)
	if e.watchdog > 0 {
		go e.feedWatchdog(done)
	}
	cfg, st := e.cfg, e.loadState()
	var run *runHandle
	for {
		end := e.live(ctx, cfg, st, run, false)
		if end.reload == nil {
			if end.err != nil {
				e.notifier.Stopping()
			}
			return end.err
		}
		e.log.Info("configuration reloaded; a new life starts with it")
		cfg, st, run = *end.reload, end.st, end.run
	}
}

func (e *Engine) loadState() State {
	st, err := loadState(e.root)
	if err != nil {
		e.log.Warn("agent state", zap.Error(err))
	}
	return st
}

// feedWatchdog tells systemd's watchdog the agent is alive while it is
// healthy. If the owner of the state stalls (a stuck poll, a deadlock) the
// feeding stops and systemd restarts the agent.
func (e *Engine) feedWatchdog(done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		case <-e.clock.After(e.watchdog):
		}
		if e.healthy() {
			e.notifier.Watchdog()
		}
	}
}

// workerEnd bounds the wait for a worker to end when its life does, and for
// systemd to list the runs left going: every worker honours cancellation,
// but a call that does not (a wedged file system) must not hold a reload or
// a stop.
const workerEnd = 10 * time.Second

// lifeEnd is how a life ended.
type lifeEnd struct {
	// reload, when set, is the configuration of the next life; run and st
	// go on into it.
	reload *config.Config
	run    *runHandle
	st     State
	res    Result
	err    error
}

// life is the driver of one life: the goroutine that owns the state. It
// hands events to the machine, carries out its actions (starting workers,
// which report back on events), saves the state when it changed, and keeps
// the health the watchdog and /healthz read.
type life struct {
	e      *Engine
	cfg    config.Config
	md     Metadata
	m      *machine
	store  *store
	ctx    context.Context
	wg     sync.WaitGroup
	events chan event
	run    *runHandle
	// stopRegister ends the registration going before its next request.
	stopRegister func()
	stalled      bool
	saveFailed   repeatLog
}

// live runs one life with cfg from st, following carried, a run going on
// from the life before.
func (e *Engine) live(ctx context.Context, cfg config.Config, st State, carried *runHandle, once bool) lifeEnd {
	wctx, cancel := context.WithCancel(context.Background())
	l := &life{
		e: e, cfg: cfg, md: e.metadata(cfg), store: &store{root: e.root}, ctx: wctx, events: make(chan event, 4), run: carried,
		saveFailed: repeatLog{log: e.log, msg: "could not save the agent state", recovered: "the agent state is saved again"},
	}
	l.m = newMachine(machineOptions{
		log: e.log, metrics: e.m, version: e.version, cfg: cfg, once: once, started: e.started, clock: e.clock,
		newRunID: newRunID, retry: e.retryPolicy,
	}, st)
	defer func() {
		cancel()
		done := make(chan struct{})
		go func() { l.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-e.clock.After(workerEnd):
			l.m.log.Warn("a worker of the life that ends is still going (a call that ignores cancellation); going on without it", zap.Duration("waited", workerEnd))
		}
	}()
	if !once {
		l.serveMetrics()
	}

	start := evStart{}
	if carried != nil {
		start.run = &carried.info
		e.log.Info("the chef-client run going goes on through the reload", zap.String("run_id", carried.info.id))
	} else if f, ok := e.runner.(follower); ok {
		lctx, cancelLook := context.WithTimeout(ctx, workerEnd)
		id, found, err := f.Running(lctx)
		cancelLook()
		switch {
		case err != nil:
			e.log.Warn("could not look for a chef-client run left going", zap.Error(err))
		case found:
			e.log.Info("following a chef-client run that was going when the agent restarted", zap.String("run_id", id))
			info := runInfo{id: id, started: e.clock.Now()}
			l.run = startRun(info, func(ctx context.Context) (chef.Outcome, error) { return f.Follow(ctx, id) })
			start.run = &info
		}
	}

	stop := ctx.Done()
	reload := e.reload
	if once {
		reload = nil
	}
	beatEvery := cfg.IMDS.PollInterval.D()
	if e.watchdog > 0 {
		beatEvery = min(beatEvery, e.watchdog)
	}
	beat := e.clock.After(beatEvery)
	var timer <-chan time.Time
	var timerAt time.Time
	// reloadTo is the configuration of a reload that waits for the life to
	// end (for a registration going to answer).
	var reloadTo *config.Config
	ev := event(start)
	for {
		now := e.clock.Now()
		acts := l.m.step(now, ev)
		// Saved before the actions are carried out: a registration is on
		// disk as begun before its first request, so that a crash at any
		// point leaves a state that knows what the server may hold.
		saved := l.save(now)
		if nd, ok := ev.(evNodeDeleted); ok {
			// Even unsaved: the client goes anyway, since deleting it
			// matters more than a record a crash might lose.
			close(nd.saved)
		}
		exit, ended := l.do(acts, saved)
		l.keepHealth(now)
		if ended {
			l.stopRun()
			return lifeEnd{st: l.m.st, res: l.m.res, err: exit.err}
		}
		if reloadTo != nil && l.m.noReload() != "" {
			// The instance began to terminate (or the agent to stop) while
			// the reload waited: the reload is dropped.
			l.m.log.Info("configuration reload ignored", zap.String("why", l.m.noReload()))
			reloadTo = nil
		}
		if reloadTo != nil && l.m.reloadable() {
			return lifeEnd{reload: reloadTo, run: l.run, st: l.m.st}
		}
		if at := l.m.wake(now); !at.Equal(timerAt) {
			timerAt, timer = at, nil
			if !at.IsZero() {
				timer = e.clock.After(at.Sub(now))
			}
		}
		var runDone chan evRunEnded
		if l.run != nil {
			runDone = l.run.done
		}
		select {
		case ev = <-l.events:
		case end := <-runDone:
			l.run = nil
			ev = end
		case <-timer:
			timer, timerAt = nil, time.Time{}
			ev = evTick{}
		case <-beat:
			beat = e.clock.After(beatEvery)
			ev = evTick{}
		case <-e.trigger:
			ev = evTrigger{}
		case <-stop:
			stop = nil
			e.notifier.Stopping()
			ev = evStop{}
		case next := <-reload:
			if why := l.m.noReload(); why != "" {
				l.m.log.Info("configuration reload ignored", zap.String("why", why))
				ev = evTick{}
				break
			}
			reloadTo, ev = &next, evReload{}
		}
	}
}

// do carries out the machine's actions. It reports the exit, if one of
// them is. saved says whether the state the actions rely on is on disk: a
// registration does not begin before its name is.
func (l *life) do(acts []action, saved error) (actExit, bool) {
	e := l.e
	for _, a := range acts {
		switch a := a.(type) {
		case actBoot:
			l.work(func(ctx context.Context) event {
				b, err := e.bootstrap(ctx, l.md, l.cfg, a.previous, l.send)
				if err != nil {
					return evBootFailed{err: err}
				}
				return evBooted{b: b}
			})
		case actRegister:
			if saved != nil {
				l.work(func(context.Context) event {
					return evRegisterFailed{err: fmt.Errorf("the registration waits until the agent state can be saved: %w", saved)}
				})
				continue
			}
			stop := make(chan struct{})
			l.stopRegister = sync.OnceFunc(func() { close(stop) })
			log := l.m.log
			l.work(func(ctx context.Context) event {
				start := e.clock.Now()
				reg, err := e.register(ctx, log, a.plan.cfg, a.plan.chef, stop)
				if err != nil {
					return evRegisterFailed{err: err}
				}
				return evRegistered{reg: reg, took: e.clock.Now().Sub(start)}
			})
		case actStopRegister:
			if l.stopRegister != nil {
				l.stopRegister()
			}
		case actRun:
			spec := chef.RunSpec{
				ID:      a.run.id,
				Command: e.command(a.plan.cfg.Chef, a.run.first),
				Timeout: a.timeout,
				Grace:   runGrace,
				Log:     l.m.runLog(a.run.id),
			}
			ch, first, runProxies := a.plan.cfg.Chef, a.run.first, proxies(a.plan.cfg.Chef)
			spec.EnvironmentFile = e.path(runEnvPath)
			clientRB, log := a.plan.chef.clientRB, l.m.log
			l.run = startRun(a.run, func(ctx context.Context) (chef.Outcome, error) {
				if err := e.checkJSONAttribs(ch, first); err != nil {
					return chef.Outcome{ID: spec.ID}, err
				}
				if err := e.refreshClientRB(log, clientRB); err != nil {
					return chef.Outcome{ID: spec.ID}, err
				}
				if err := e.writeRunEnvironment(ch.LicenseKeyFile, runProxies); err != nil {
					return chef.Outcome{ID: spec.ID}, err
				}
				return e.runner.Run(ctx, spec)
			})
		case actEndRun:
			if l.run != nil {
				l.run.cancel(a.cause)
			}
		case actPoll:
			log := l.m.log
			l.work(func(ctx context.Context) event { return e.poll(ctx, log, l.md, a) })
		case actDeregister:
			l.work(func(ctx context.Context) event {
				return deregisterAll(ctx, e.root, e.clock, e.retryPolicy(registerRetry), a, observeChef(e.m), func() {
					saved := make(chan struct{})
					l.send(evNodeDeleted{saved: saved})
					select {
					case <-saved:
					case <-l.ctx.Done():
					}
				})
			})
		case actStatus:
			e.notifier.Status(a.status)
		case actReady:
			e.notifier.Ready(a.status)
		case actExit:
			return a, true
		}
	}
	return actExit{}, false
}

// work runs a worker of this life; its result is its event.
func (l *life) work(f func(ctx context.Context) event) {
	l.wg.Go(func() { l.send(f(l.ctx)) })
}

// send gives the owner of the state an event, unless the life is over.
func (l *life) send(ev event) {
	select {
	case l.events <- ev:
	case <-l.ctx.Done():
	}
}

// stopRun stops following (or, for a child process, ends) a run still
// going when the agent stops.
func (l *life) stopRun() {
	if l.run != nil {
		l.run.cancel(errStopping)
	}
}

// save writes the state when it changed, and says why it could not. A
// state that cannot be saved is logged, not fatal: every step is safe to
// take again.
func (l *life) save(now time.Time) error {
	if err := l.store.save(l.m.st, now); err != nil {
		l.saveFailed.fail(err)
		return err
	}
	l.saveFailed.ok()
	l.e.m.Changed()
	return nil
}

// keepHealth moves the health on while the loop turns and no poll is
// stuck; a stuck poll ends it at once.
func (l *life) keepHealth(now time.Time) {
	stalled := l.m.stalled(now)
	if stalled {
		l.e.healthyUntil.Store(0)
	} else {
		l.e.healthyUntil.Store(now.Add(3*l.cfg.IMDS.PollInterval.D() + time.Second).UnixNano())
	}
	switch {
	case stalled && !l.stalled:
		l.m.log.Error("a poll is stuck (the host name check or IMDS); not feeding the systemd watchdog", zap.Duration("since", now.Sub(l.m.pollStarted)))
	case !stalled && l.stalled:
		l.m.log.Info("polls end again; feeding the watchdog")
	}
	l.stalled = stalled
}

// serveMetrics keeps the node_exporter textfile and serves /metrics and
// /healthz, as this life's configuration asks.
func (l *life) serveMetrics() {
	e := l.e
	if p := l.cfg.Metrics.Textfile; p != "" {
		e.m.Changed()
		l.wg.Go(func() { e.m.KeepTextfile(l.ctx, e.root, p, e.log) })
	}
	if addr := l.cfg.Metrics.Listen; addr != "" {
		l.wg.Go(func() {
			if err := e.m.Serve(l.ctx, addr, e.healthy, e.log); err != nil {
				e.log.Error("metrics listener failed; the agent goes on without it", zap.Error(err))
			}
		})
	}
}

// poll is the poll worker: IMDS's notices first (a termination must not
// wait for anything), then the IMDS filter and the host name, each put
// back if it drifted.
func (e *Engine) poll(ctx context.Context, log *zap.Logger, md Metadata, a actPoll) evPolled {
	ev := evPolled{notices: md.Notices(ctx)}
	if a.plan != nil && len(a.plan.cfg.IMDS.AllowUsers) > 0 {
		e.filter.report(log, e.filter.keep(a.plan.cfg.IMDS))
	}
	if !a.noticesOnly && a.plan != nil && !a.plan.name.IsZero() {
		ev.changes, ev.driftErr = e.namer.Apply(ctx, a.plan.name, policy(a.plan.cfg))
	}
	return ev
}
