package chef

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/bootagent/bootagent/internal/testenv"
)

func TestResultOfFollowsRFC062(t *testing.T) {
	tests := []struct {
		code   int
		want   Result
		failed bool
	}{
		{0, ResultSuccess, false},
		{1, ResultFailed, true},
		{2, ResultInterrupted, true},
		{3, ResultInterrupted, true},
		{35, ResultRebootScheduled, false},
		{37, ResultRebootNeeded, false},
		{41, ResultRebootFailed, true},
		{42, ResultAuditFailed, true},
		{43, ResultConfigFailed, true},
		{173, ResultLicense, true},
		{213, ResultClientUpgraded, false},
		{99, ResultUnknown, true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("exit %d is %s", tt.code, tt.want), func(t *testing.T) {
			assert.Equal(t, tt.want, ResultOf(tt.code))
			assert.Equal(t, tt.failed, tt.want.Failed())
		})
	}
}

func observedLog(t *testing.T) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.DebugLevel)
	return zap.New(zapcore.NewTee(core, zaptest.NewLogger(t).Core())), logs
}

func TestProcessRunnerReportsTheExitCodeAndStreamsOutput(t *testing.T) {
	log, logs := observedLog(t)
	r := ProcessRunner{Log: log}
	for _, code := range []int{0, 1, 35, 213} {
		out, err := r.Run(context.Background(), RunSpec{
			ID:      "run-" + strconv.Itoa(code),
			Command: []string{"sh", "-c", `echo "converging"; echo "oops" >&2; printf 'no newline'; exit ` + strconv.Itoa(code)},
			Timeout: time.Hour, Grace: time.Second,
		})
		require.NoError(t, err)
		assert.Equal(t, code, out.ExitCode)
		assert.Equal(t, ResultOf(code), out.Result)
		assert.Contains(t, out.Tail, "oops")
	}
	lines := logs.FilterField(zap.String("run_id", "run-35")).All()
	var got []string
	for _, l := range lines {
		got = append(got, l.Message)
	}
	assert.Subset(t, got, []string{"chef-client started", "converging", "oops", "no newline"})
}

// pidAlive reports whether a process exists (and is not a zombie).
func pidAlive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	fields := strings.Fields(string(data))
	return len(fields) > 2 && fields[2] != "Z"
}

// runInBackground starts a run whose shell leaves a grandchild, and returns
// the grandchild's PID once it is written.
func runInBackground(t *testing.T, r ProcessRunner, ctx context.Context, script string) (chan Outcome, int) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	done := make(chan Outcome, 1)
	go func() {
		out, err := r.Run(ctx, RunSpec{ID: "r1", Command: []string{"sh", "-c", script, "sh", pidFile}, Timeout: time.Hour, Grace: 30 * time.Second})
		assert.NoError(t, err)
		done <- out
	}()
	var pid int
	testenv.Eventually(t, 5*time.Second, func() bool {
		data, err := os.ReadFile(pidFile)
		if err != nil {
			return false
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(data)))
		return err == nil
	}, "the run writes its grandchild's pid")
	return done, pid
}

func TestProcessRunnerTimeoutEndsTheWholeProcessGroup(t *testing.T) {
	clock := testenv.NewManualClock()
	r := ProcessRunner{Log: zaptest.NewLogger(t), Clock: clock}
	done, grandchild := runInBackground(t, r, context.Background(), `sleep 600 & echo $! > "$1"; wait`)
	require.True(t, pidAlive(grandchild))
	testenv.Eventually(t, 5*time.Second, func() bool { return clock.Waiters() == 1 }, "the run timeout is set")

	clock.Advance(time.Hour)
	out := <-done
	assert.Equal(t, ResultTimeout, out.Result)
	assert.Equal(t, time.Hour, out.Duration)
	testenv.Eventually(t, 5*time.Second, func() bool { return !pidAlive(grandchild) }, "the grandchild got SIGTERM too")
}

func TestProcessRunnerKillsARunThatIgnoresSIGTERM(t *testing.T) {
	clock := testenv.NewManualClock()
	r := ProcessRunner{Log: zaptest.NewLogger(t), Clock: clock}
	done, grandchild := runInBackground(t, r, context.Background(), `trap "" TERM; sleep 600 & echo $! > "$1"; wait`)
	testenv.Eventually(t, 5*time.Second, func() bool { return clock.Waiters() == 1 }, "the run timeout is set")

	clock.Advance(time.Hour)
	testenv.Eventually(t, 5*time.Second, func() bool { return clock.Waiters() == 1 }, "the grace period starts")
	select {
	case <-done:
		t.Fatal("a run that ignores SIGTERM ended before the grace period")
	default:
	}
	require.True(t, pidAlive(grandchild), "SIGTERM is ignored")
	clock.Advance(30 * time.Second)
	out := <-done
	assert.Equal(t, ResultTimeout, out.Result)
	assert.Equal(t, syscall.SIGKILL.String(), out.Signal)
	testenv.Eventually(t, 5*time.Second, func() bool { return !pidAlive(grandchild) }, "SIGKILL reached the grandchild")
}

func TestProcessRunnerStopsTheRunWhenTheAgentStops(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	r := ProcessRunner{Log: zaptest.NewLogger(t), Clock: testenv.NewManualClock()}
	done, grandchild := runInBackground(t, r, ctx, `sleep 600 & echo $! > "$1"; wait`)
	cancel()
	out := <-done
	assert.Equal(t, ResultInterrupted, out.Result)
	testenv.Eventually(t, 5*time.Second, func() bool { return !pidAlive(grandchild) }, "the run's processes are gone")
}

func TestProcessRunnerFailsToStartAMissingCommand(t *testing.T) {
	_, err := ProcessRunner{Log: zaptest.NewLogger(t)}.Run(context.Background(), RunSpec{ID: "x", Command: []string{"/nonexistent/chef-client", "-c", "x"}, Timeout: time.Minute})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `chef.client_command "/nonexistent/chef-client" is not on this machine`)
	assert.Contains(t, err.Error(), NotInstalledFix)
}

func TestProcessRunnerKillsByTheTimeAnEndRunSays(t *testing.T) {
	clock := testenv.NewManualClock()
	r := ProcessRunner{Log: zaptest.NewLogger(t), Clock: clock}
	ctx, cancel := context.WithCancelCause(context.Background())
	done, grandchild := runInBackground(t, r, ctx, `trap "" TERM; sleep 600 & echo $! > "$1"; wait`)
	testenv.Eventually(t, 5*time.Second, func() bool { return clock.Waiters() == 1 }, "the run timeout is set")

	cancel(&EndRun{Why: "the instance terminates", By: clock.Now().Add(10 * time.Second)})
	testenv.Eventually(t, 5*time.Second, func() bool { return clock.Waiters() == 2 }, "SIGTERM is sent and the kill set")
	clock.Advance(10 * time.Second)
	out := <-done
	assert.Equal(t, syscall.SIGKILL.String(), out.Signal, "killed 10 s after SIGTERM, not the 30 s grace")
	assert.Equal(t, ResultInterrupted, out.Result)
	testenv.Eventually(t, 5*time.Second, func() bool { return !pidAlive(grandchild) }, "SIGKILL reached the grandchild")
	assert.ErrorIs(t, &EndRun{}, ErrEndRun)
}
