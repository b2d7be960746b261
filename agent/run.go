package agent

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/config"
)

// bootstrapRetry paces retries of a failed bootstrap pass: soon at first,
// then no more than every five minutes, so that a fleet whose IMDS or disk
// hiccupped recovers quickly without hammering anything.
var bootstrapRetry = backoff.Policy{Initial: time.Second, Max: 5 * time.Minute, Jitter: 0.5}

// Run bootstraps the instance, retrying failures that can pass, then until
// ctx ends runs chef-client on its schedule and re-applies the host name
// whenever it drifts. Invalid configuration or user-data ends Run with an
// error matching config.ErrInvalid, since retrying cannot fix it.
func (e *Engine) Run(ctx context.Context) error {
	res, err := e.bootstrap(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil //nolint:nilerr // Stopped while bootstrapping: a shutdown, not a failure.
		}
		return err
	}
	var wg sync.WaitGroup
	if res.chef != nil {
		wg.Go(func() { e.schedule(ctx, res) })
	}
	e.watch(ctx, res)
	wg.Wait()
	return nil
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
	})
	if err == nil {
		failures.ok()
	}
	return res, err
}

// watch re-checks the host name every poll interval until ctx ends.
func (e *Engine) watch(ctx context.Context, res Result) {
	log := e.log.With(zap.String("instance_id", res.Identity.InstanceID))
	drift := repeatLog{log: log, msg: "hostname check failed", recovered: "hostname check works again"}
	interval := res.Config.IMDS.PollInterval.D()
	for {
		if err := backoff.Wait(ctx, e.clock, interval); err != nil {
			return
		}
		if res.Hostname.IsZero() {
			continue
		}
		changes, err := e.namer.Apply(ctx, res.Hostname, policy(res.Config))
		for _, c := range changes {
			log.Warn("hostname drift corrected", zap.String("what", c.What), zap.String("old", c.Old), zap.String("new", c.New))
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			drift.fail(err)
			continue
		}
		drift.ok()
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
