package agent

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/internal/testenv"
)

// scriptedRunner stands in for chef-client at the Runner boundary: each run
// is announced on started and ends when the test sends its outcome.
type scriptedRunner struct {
	started chan chef.RunSpec
	finish  chan chef.Outcome
}

func (r *scriptedRunner) Run(ctx context.Context, spec chef.RunSpec) (chef.Outcome, error) {
	r.started <- spec
	select {
	case out := <-r.finish:
		out.ID = spec.ID
		return out, nil
	case <-ctx.Done():
		return chef.Outcome{ID: spec.ID, Result: chef.ResultInterrupted}, ctx.Err()
	}
}

type scheduleHarness struct {
	clock  *testenv.ManualClock
	runner *scriptedRunner
	engine *Engine
	logs   *observer.ObservedLogs
	period time.Duration
}

const (
	testInterval = 30 * time.Minute
	testSplay    = 5 * time.Minute
	testInstance = "i-0123456789abcdef0"
)

func startSchedule(t *testing.T) *scheduleHarness {
	h := &scheduleHarness{clock: testenv.NewManualClock(), runner: &scriptedRunner{started: make(chan chef.RunSpec), finish: make(chan chef.Outcome)}}
	core, logs := observer.New(zapcore.InfoLevel)
	h.logs = logs
	cfg := config.Default()
	cfg.Chef.Interval, cfg.Chef.Splay = config.Duration(testInterval), config.Duration(testSplay)
	h.engine = New(context.Background(), Options{
		Config: cfg, Root: t.TempDir(), Clock: h.clock, Runner: h.runner,
		Log: zap.New(zapcore.NewTee(core, zaptest.NewLogger(t).Core())),
	})
	h.period = testInterval + splayFor(testInstance, testSplay)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.engine.schedule(ctx, Result{Config: cfg, Identity: imds.Identity{InstanceID: testInstance}, NodeName: "web01"})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return h
}

// nextRun waits for the scheduler to start a run.
func (h *scheduleHarness) nextRun(t *testing.T) chef.RunSpec {
	t.Helper()
	select {
	case spec := <-h.runner.started:
		return spec
	case <-time.After(10 * time.Second):
		t.Fatal("no chef-client run started")
		return chef.RunSpec{}
	}
}

// noRun checks that no run has started.
func (h *scheduleHarness) noRun(t *testing.T) {
	t.Helper()
	select {
	case spec := <-h.runner.started:
		t.Fatalf("unexpected run %s", spec.ID)
	default:
	}
}

// finish ends the running run with out and waits until the scheduler has
// planned the next one.
func (h *scheduleHarness) finish(t *testing.T, out chef.Outcome) {
	t.Helper()
	msg := "next chef-client run"
	if out.Result.Failed() {
		msg = "next chef-client run soon, after the failure"
	}
	before := h.logs.FilterMessage(msg).Len()
	h.runner.finish <- out
	testenv.Eventually(t, 10*time.Second, func() bool { return h.logs.FilterMessage(msg).Len() > before }, "the scheduler plans the next run")
}

// waitTimer waits until the scheduler's next run is planned as ok wants,
// and returns how far away it is.
func (h *scheduleHarness) waitTimer(t *testing.T, ok func(time.Duration) bool, what string) time.Duration {
	t.Helper()
	var got time.Duration
	testenv.Eventually(t, 10*time.Second, func() bool {
		got = h.engine.NextRun().Sub(h.clock.Now())
		return ok(got)
	}, "%s (next run in %s)", what, got)
	return got
}

func hasFirstBoot(spec chef.RunSpec) bool { return slices.Contains(spec.Command, "-j") }

func TestScheduleRunsAtOnceThenEveryIntervalPlusSplay(t *testing.T) {
	h := startSchedule(t)

	first := h.nextRun(t)
	assert.True(t, hasFirstBoot(first), "the first run gets the first-boot JSON: %v", first.Command)
	assert.Equal(t, time.Hour, first.Timeout, "chef.run_timeout")
	h.finish(t, chef.Outcome{Result: chef.ResultSuccess})

	h.waitTimer(t, func(d time.Duration) bool { return d == h.period }, "the next run is an interval plus the splay away")
	h.clock.Advance(h.period - time.Second)
	h.noRun(t)
	h.clock.Advance(time.Second)
	second := h.nextRun(t)
	assert.False(t, hasFirstBoot(second), "later runs do without it: %v", second.Command)
	h.finish(t, chef.Outcome{Result: chef.ResultSuccess})
}

func TestScheduleSkipsARunWhileThePreviousIsGoing(t *testing.T) {
	h := startSchedule(t)
	h.nextRun(t)
	h.waitTimer(t, func(d time.Duration) bool { return d == h.period }, "the next run is planned from the start of this one")

	h.clock.Advance(h.period)
	testenv.Eventually(t, 5*time.Second, func() bool {
		return h.logs.FilterMessage("chef-client run skipped: the previous run is still going").Len() == 1
	}, "the overlapping run is skipped and logged")
	h.noRun(t)

	h.engine.TriggerRun()
	testenv.Eventually(t, 5*time.Second, func() bool {
		return h.logs.FilterMessage("chef-client run skipped: the previous run is still going").Len() == 2
	}, "a run asked for by SIGUSR1 while one is going is skipped too")
	h.finish(t, chef.Outcome{Result: chef.ResultSuccess})
	h.noRun(t)
}

func TestScheduleRetriesAFailedRunSoonerWithBackoff(t *testing.T) {
	h := startSchedule(t)
	h.nextRun(t)
	h.finish(t, chef.Outcome{Result: chef.ResultFailed, ExitCode: 1})

	var delays []time.Duration
	for range 6 {
		d := h.waitTimer(t, func(d time.Duration) bool { return d < h.period }, "a failed run is retried before the interval")
		delays = append(delays, d)
		h.clock.Advance(d)
		retry := h.nextRun(t)
		assert.True(t, hasFirstBoot(retry), "until a first run succeeds, retries keep the first-boot JSON")
		h.finish(t, chef.Outcome{Result: chef.ResultFailed, ExitCode: 1})
	}
	assert.GreaterOrEqual(t, delays[0], 30*time.Second, "delays: %v", delays)
	assert.LessOrEqual(t, delays[0], time.Minute, "delays: %v", delays)
	for _, d := range delays {
		assert.LessOrEqual(t, d, testInterval, "capped at the interval: %v", delays)
	}
	assert.Greater(t, delays[5], delays[0], "the delays grow: %v", delays)
}

func TestScheduleTreatsRebootRequestsAsSuccess(t *testing.T) {
	h := startSchedule(t)
	h.nextRun(t)
	h.finish(t, chef.Outcome{Result: chef.ResultOf(37), ExitCode: 37})
	h.waitTimer(t, func(d time.Duration) bool { return d == h.period }, "a converge that needs a reboot is not retried")
}

func TestTriggerRunStartsARunNow(t *testing.T) {
	h := startSchedule(t)
	h.nextRun(t)
	h.finish(t, chef.Outcome{Result: chef.ResultSuccess})
	h.waitTimer(t, func(d time.Duration) bool { return d == h.period }, "idle until the next run")

	h.engine.TriggerRun()
	spec := h.nextRun(t)
	assert.False(t, hasFirstBoot(spec))
	h.finish(t, chef.Outcome{Result: chef.ResultSuccess})
}

func TestSplayIsFixedPerInstanceAndSpreadsAFleet(t *testing.T) {
	assert.Equal(t, splayFor(testInstance, testSplay), splayFor(testInstance, testSplay), "a restart does not reshuffle")
	seen := map[time.Duration]bool{}
	for i := range 1000 {
		d := splayFor(fmt.Sprintf("i-%017x", i), testSplay)
		require.GreaterOrEqual(t, d, time.Duration(0))
		require.Less(t, d, testSplay)
		seen[d] = true
	}
	assert.Greater(t, len(seen), 250, "1000 instances spread over 300 possible seconds: %d distinct", len(seen))
	assert.Zero(t, splayFor(testInstance, 0))
}

func TestRunChefRefusesToRunTwiceAtOnce(t *testing.T) {
	e := New(context.Background(), Options{Config: config.Default(), Root: t.TempDir(), Log: zaptest.NewLogger(t), Runner: &scriptedRunner{}})
	unlock, err := flock(e.path(runLockPath))
	require.NoError(t, err)
	defer unlock()
	_, err = e.runChef(context.Background(), Result{Config: config.Default()}, false, time.Hour)
	require.ErrorIs(t, err, errRunLocked)
}
