package chef

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
)

// Result names how a chef-client run ended, after Chef RFC 062's exit
// codes, plus the endings the agent itself causes.
type Result string

// Run results.
const (
	ResultSuccess            Result = "success"              // 0
	ResultFailed             Result = "failed"               // 1
	ResultInterrupted        Result = "interrupted"          // 2 (SIGINT), 3 (SIGTERM)
	ResultRebootScheduled    Result = "reboot_scheduled"     // 35
	ResultRebootNeeded       Result = "reboot_needed"        // 37
	ResultRebootFailed       Result = "reboot_failed"        // 41
	ResultAuditFailed        Result = "audit_failed"         // 42
	ResultConfigFailed       Result = "config_failed"        // 43
	ResultLicenseNotAccepted Result = "license_not_accepted" // 172
	ResultLicense            Result = "license_refused"      // 173, 174
	ResultClientUpgraded     Result = "client_upgraded"      // 213
	ResultTimeout            Result = "timeout"              // chef.run_timeout passed
	ResultKilled             Result = "killed"               // ended by a signal it did not handle
	ResultUnknown            Result = "unknown_exit"         // any other exit code
)

// Results are every result a run can have, for metrics that start at 0.
var Results = []Result{ResultSuccess, ResultFailed, ResultInterrupted, ResultRebootScheduled, ResultRebootNeeded,
	ResultRebootFailed, ResultAuditFailed, ResultConfigFailed, ResultLicenseNotAccepted, ResultLicense,
	ResultClientUpgraded, ResultTimeout, ResultKilled, ResultUnknown}

// ResultOf maps a chef-client exit code to its result.
func ResultOf(code int) Result {
	switch code {
	case 0:
		return ResultSuccess
	case 1:
		return ResultFailed
	case 2, 3:
		return ResultInterrupted
	case 35:
		return ResultRebootScheduled
	case 37:
		return ResultRebootNeeded
	case 41:
		return ResultRebootFailed
	case 42:
		return ResultAuditFailed
	case 43:
		return ResultConfigFailed
	case 172:
		return ResultLicenseNotAccepted
	case 173, 174:
		return ResultLicense
	case 213:
		return ResultClientUpgraded
	default:
		return ResultUnknown
	}
}

// Failed reports whether the run failed. A run that converged and asks for
// a reboot (35, 37), or that upgraded chef-client itself (213), did its job.
func (r Result) Failed() bool {
	switch r {
	case ResultSuccess, ResultRebootScheduled, ResultRebootNeeded, ResultClientUpgraded:
		return false
	default:
		return true
	}
}

// Fix says what to do about a run that ended so, or "" when there is no
// one thing to do.
func (r Result) Fix() string {
	if r == ResultLicenseNotAccepted {
		return "chef-client refuses to run until its license is accepted: set chef.license: accept in the agent's config " +
			"(or chef_license: accept in the user-data's chef block), or accept it when baking the image (chef-client --chef-license accept)"
	}
	return ""
}

// RunSpec is one chef-client run to make.
type RunSpec struct {
	// ID names the run in logs, the journal and the agent's state.
	ID      string
	Command []string
	// Timeout bounds the run; then it gets SIGTERM, and SIGKILL Grace later,
	// its whole process group (or unit) with it.
	Timeout time.Duration
	Grace   time.Duration
	// Log is where the run's lines go; nil is the runner's own logger with
	// the run's id.
	Log *zap.Logger
	// EnvironmentFile, when set, is a file of KEY=VALUE lines, root's
	// alone, added to chef-client's environment: the way to hand it a
	// secret (CHEF_LICENSE_KEY), which on a command line or in a unit's
	// Environment= every user of the machine could read.
	EnvironmentFile string
}

// logger is the run's logger.
func (s RunSpec) logger(fallback *zap.Logger) *zap.Logger {
	if s.Log != nil {
		return s.Log
	}
	return fallback.With(zap.String("run_id", s.ID))
}

// Outcome is how a run ended.
type Outcome struct {
	ID       string        `json:"id"`
	Start    time.Time     `json:"start"`
	Duration time.Duration `json:"duration"`
	// ExitCode is chef-client's, or -1 when a signal ended it.
	ExitCode int    `json:"exit_code"`
	Signal   string `json:"signal,omitempty"`
	Result   Result `json:"result"`
	// Unit is the transient systemd unit the run had, if any.
	Unit string `json:"unit,omitempty"`
	// Tail is the end of the run's output, kept for failures.
	Tail []string `json:"-"`
}

// ErrEndRun is the cause (see context.WithCancelCause) that asks a runner
// to end the run itself when the run's context ends, not only to stop
// following it: a run in a transient unit is stopped too. A child process
// is ended whatever the cause, since it cannot outlive the agent. The
// cause says why, in the log.
var ErrEndRun = errors.New("the chef-client run is to end")

// EndRun is an ErrEndRun cause with a time: the run gets SIGKILL no later
// than By, however long its grace, so that what must follow it (the
// deletions of a terminating instance) keeps its time.
type EndRun struct {
	Why string
	By  time.Time
}

func (e *EndRun) Error() string { return ErrEndRun.Error() + ": " + e.Why }

// Is makes an EndRun an ErrEndRun.
func (e *EndRun) Is(target error) bool { return target == ErrEndRun }

// graceFor is how long a run whose context ended for cause may take to end
// after SIGTERM: its grace, or less when the cause says by when.
func graceFor(cause error, grace time.Duration, now time.Time) time.Duration {
	var e *EndRun
	if errors.As(cause, &e) && !e.By.IsZero() {
		return max(0, min(grace, e.By.Sub(now)))
	}
	return grace
}

// NotInstalledFix says what to do when chef-client is not on the machine:
// bootagent runs it, and leaves installing it to the image (cloud-init's
// install_type and omnibus keys are not bootagent's).
const NotInstalledFix = "the image must carry chef-client: bake Chef Infra Client (or Cinc, with chef.client_command: [cinc-client]) into it, " +
	"or point chef.client_command at where it is; bootagent does not install it"

// LookCommand finds the run's command on this machine, so that a missing
// chef-client is said to be missing, the same way by either runner and by
// diagnose.
func LookCommand(command []string) (string, error) {
	path, err := exec.LookPath(command[0])
	if err != nil {
		return "", fmt.Errorf("chef.client_command %q is not on this machine (%w)", command[0], err)
	}
	return path, nil
}

// lookCommand is LookCommand for a run, whose error says what to do too.
func lookCommand(command []string) error {
	if _, err := LookCommand(command); err != nil {
		return fmt.Errorf("%w: %s", err, NotInstalledFix)
	}
	return nil
}

// Runner runs chef-client to the end and says how it ended. An error means
// the run could not be started or followed.
type Runner interface {
	Run(ctx context.Context, spec RunSpec) (Outcome, error)
}

// tailLines is how much of a run's output a failure report carries.
const tailLines = 20

// ProcessRunner runs chef-client as a child process in its own process
// group, streaming its output into the log line by line. It is used where
// systemd is not the agent's manager (tests, the demo, `bootagent once`
// from a shell), and by the UnitRunner when systemd cannot be reached.
// When ctx ends the run is stopped like a timed-out one.
type ProcessRunner struct {
	Log   *zap.Logger
	Clock backoff.Clock
}

// Run starts the command and follows it to the end.
func (p ProcessRunner) Run(ctx context.Context, spec RunSpec) (Outcome, error) {
	clock := p.Clock
	if clock == nil {
		clock = backoff.RealClock{}
	}
	log := spec.logger(p.Log)
	out := Outcome{ID: spec.ID, Start: clock.Now()}
	if err := lookCommand(spec.Command); err != nil {
		return out, err
	}
	tail := &lineLog{log: log, stream: "stdout"}
	errTail := &lineLog{log: log, stream: "stderr", tail: tail}
	cmd := exec.Command(spec.Command[0], spec.Command[1:]...)
	if spec.EnvironmentFile != "" {
		env, err := os.ReadFile(spec.EnvironmentFile)
		if err != nil {
			return out, fmt.Errorf("chef-client's environment: %w", err)
		}
		cmd.Env = append(os.Environ(), strings.Split(strings.TrimSpace(string(env)), "\n")...)
	}
	// Its own process group, so a timeout reaches every process the run
	// started, not only chef-client.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stdout, cmd.Stderr = tail, errTail
	// A process the run left behind may hold the output open; do not wait
	// for it once chef-client itself has exited.
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		return out, fmt.Errorf("start %s: %w", strings.Join(spec.Command, " "), err)
	}
	log.Info("chef-client started", zap.Strings("command", spec.Command), zap.Int("pid", cmd.Process.Pid))
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()

	signalled := Result("")
	timeout := clock.After(spec.Timeout)
	var kill <-chan time.Time
	var waitErr error
wait:
	for {
		select {
		case waitErr = <-done:
			break wait
		case <-timeout:
			signalled = ResultTimeout
			log.Warn("chef-client ran past chef.run_timeout; sending SIGTERM to its process group", zap.Duration("timeout", spec.Timeout))
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
			kill = clock.After(spec.Grace)
			timeout = nil
		case <-ctx.Done():
			if signalled == "" {
				signalled = ResultInterrupted
				grace := graceFor(context.Cause(ctx), spec.Grace, clock.Now())
				log.Warn("stopping chef-client; sending SIGTERM to its process group", zap.String("why", context.Cause(ctx).Error()), zap.Duration("grace", grace))
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
				kill = clock.After(grace)
			}
			ctx = context.Background() // Only once.
		case <-kill:
			log.Warn("chef-client outlived SIGTERM; sending SIGKILL to its process group", zap.Duration("grace", spec.Grace))
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			kill = nil
		}
	}
	tail.flush()
	errTail.flush()
	out.Duration = clock.Now().Sub(out.Start)
	out.Tail = tail.lines()
	out.ExitCode = cmd.ProcessState.ExitCode()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		out.Signal = ws.Signal().String()
	}
	switch {
	case signalled != "":
		out.Result = signalled
	case out.Signal != "":
		out.Result = ResultKilled
	default:
		out.Result = ResultOf(out.ExitCode)
	}
	if waitErr != nil && !errors.As(waitErr, new(*exec.ExitError)) && !errors.Is(waitErr, exec.ErrWaitDelay) {
		return out, fmt.Errorf("wait for %s: %w", spec.Command[0], waitErr)
	}
	return out, nil
}

// lineLog logs what a run writes, one entry per line, and keeps the last
// lines of both streams for the failure report.
type lineLog struct {
	log    *zap.Logger
	stream string
	// tail, when set, is where the lines are kept (stdout's, shared).
	tail *lineLog

	mu      sync.Mutex
	partial []byte
	last    []string
}

func (l *lineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		l.emit(string(bytes.TrimRight(l.partial[:i], "\r")))
		l.partial = l.partial[i+1:]
	}
	// A line without an end is logged in pieces rather than held forever.
	if len(l.partial) > 64<<10 {
		l.emit(string(l.partial))
		l.partial = nil
	}
	return len(p), nil
}

func (l *lineLog) emit(line string) {
	l.log.Info(line, zap.String("stream", l.stream))
	keeper := l
	if l.tail != nil {
		keeper = l.tail
		keeper.mu.Lock()
		defer keeper.mu.Unlock()
	}
	keeper.last = append(keeper.last, line)
	if len(keeper.last) > tailLines {
		keeper.last = keeper.last[len(keeper.last)-tailLines:]
	}
}

func (l *lineLog) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.partial) > 0 {
		l.emit(string(l.partial))
		l.partial = nil
	}
}

func (l *lineLog) lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.last...)
}
