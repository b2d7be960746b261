package chef

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
	"go.uber.org/zap"
)

// UnitPrefix starts the name of every transient unit that runs chef-client;
// `systemctl list-units 'bootagent-chef-client-*'` shows them, and a
// prefix drop-in (/etc/systemd/system/bootagent-chef-client-.service.d/)
// gives them all resource limits.
const UnitPrefix = "bootagent-chef-client-"

// unitPoll is how often a running unit is checked. A run lasts minutes;
// learning of its end a second late costs nothing.
const unitPoll = time.Second

// UnitRunner runs chef-client as a transient systemd service through
// systemd's D-Bus API. The run has its own cgroup and journal stream
// (`journalctl -u bootagent-chef-client-ID` or BOOTAGENT_RUN_ID=ID), is
// bounded by RuntimeMaxSec, and survives a restart of the agent, which
// follows it again when it comes back.
type UnitRunner struct {
	log *zap.Logger
	// fallback runs chef-client when systemd cannot be reached.
	fallback Runner
	// unitDir is where systemd keeps the transient units it has loaded.
	unitDir string
	// ready is closed once the connection to systemd is made or failed;
	// conn and err are set before. cancel ends the connection (and a dial
	// still going).
	ready  chan struct{}
	conn   *sddbus.Conn
	cancel context.CancelFunc
	err    error
}

// systemdTimeout bounds the connection to systemd. It is made in the
// background, so the bound costs the boot nothing; it is systemd's own
// default start timeout (DefaultTimeoutStartSec): a bus that has not
// answered by then is broken, not starting.
const systemdTimeout = 90 * time.Second

// transientDir is where systemd writes the transient units it has loaded
// (systemd.unit(5); every systemd that runs the units, 240 and later for
// Type=exec). A unit of a run is there from the moment it is made until
// systemd unloads it, failed units included, so a directory without one
// says no run is going, without asking systemd.
const transientDir = "/run/systemd/transient"

// NewUnitRunner returns at once a runner that connects to systemd on the
// system bus in the background: only the runs, and the lookup for a run
// left going when a unit of one is loaded, need the connection, so the
// boot does not wait for the bus (or for its start). When systemd cannot
// be reached, runs go to fallback, each with a warning.
func NewUnitRunner(ctx context.Context, log *zap.Logger, fallback Runner) *UnitRunner {
	cctx, cancel := context.WithCancel(ctx)
	u := &UnitRunner{log: log, fallback: fallback, unitDir: transientDir, ready: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(u.ready)
		// The connection lives as long as the context it is made with, so
		// the bound on making it cancels that context only when it fires.
		late := time.AfterFunc(systemdTimeout, cancel)
		conn, err := sddbus.NewSystemConnectionContext(cctx)
		if err == nil && (!late.Stop() || cctx.Err() != nil) {
			conn.Close()
			err = fmt.Errorf("no answer in %s, or the agent is stopping: %w", systemdTimeout, cctx.Err())
		}
		if err != nil {
			cancel()
			u.err = fmt.Errorf("connect to systemd: %w", err)
			log.Warn("cannot reach systemd; chef-client runs as a child process, inside the agent's own confinement (its unit's read-only file systems and capabilities), where cookbooks that change the system fail", zap.Error(err))
			return
		}
		u.conn = conn
	}()
	return u
}

// connection waits for the connection to systemd. One already made (or
// failed) is returned even when ctx has ended: the caller decides what an
// ended ctx means (a run told to end still stops its unit).
func (u *UnitRunner) connection(ctx context.Context) (*sddbus.Conn, error) {
	select {
	case <-u.ready:
		return u.conn, u.err
	default:
	}
	select {
	case <-u.ready:
		return u.conn, u.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close ends the D-Bus connection, or the dial still going.
func (u *UnitRunner) Close() {
	u.cancel()
	<-u.ready
	if u.conn != nil {
		u.conn.Close()
	}
}

// ManagerEnvironment is systemd's own environment (`systemctl
// show-environment`): what a transient unit, and so chef-client under the
// UnitRunner, inherits besides its environment file.
func ManagerEnvironment(ctx context.Context) ([]string, error) {
	conn, err := dbus.ConnectSystemBus(dbus.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("connect to the system bus: %w", err)
	}
	defer func() { _ = conn.Close() }()
	v, err := conn.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1").GetProperty("org.freedesktop.systemd1.Manager.Environment")
	if err != nil {
		return nil, fmt.Errorf("systemd's environment: %w", err)
	}
	env, ok := v.Value().([]string)
	if !ok {
		return nil, fmt.Errorf("systemd's environment is a %s, not a list of strings", v.Signature())
	}
	return env, nil
}

// UnitName is the transient unit of a run.
func UnitName(runID string) string { return UnitPrefix + runID + ".service" }

// Run starts chef-client as a transient unit and follows it to the end.
// When ctx ends first, the unit is left running and ctx's error returned,
// unless the cause is ErrEndRun (see Follow).
func (u *UnitRunner) Run(ctx context.Context, spec RunSpec) (Outcome, error) {
	name := UnitName(spec.ID)
	conn, err := u.connection(ctx)
	if conn == nil && ctx.Err() != nil {
		return Outcome{ID: spec.ID, Unit: name}, ctx.Err()
	}
	if err != nil {
		spec.logger(u.log).Warn("chef-client runs as a child process, inside the agent's own confinement: systemd cannot be reached", zap.Error(err))
		return u.fallback.Run(ctx, spec)
	}
	if err := lookCommand(spec.Command); err != nil {
		return Outcome{ID: spec.ID, Unit: name}, err
	}
	props := []sddbus.Property{
		sddbus.PropDescription("chef-client run " + spec.ID + ", started by bootagent"),
		sddbus.PropExecStart(spec.Command, false),
		// exec: the start job ends once chef-client is executing, so a
		// missing binary fails the start itself.
		sddbus.PropType("exec"),
		// The unit stays (active, exited) after chef-client ends, so that
		// its exit status can be read; the agent then stops it.
		sddbus.PropRemainAfterExit(true),
		{Name: "RuntimeMaxUSec", Value: dbus.MakeVariant(uint64(spec.Timeout.Microseconds()))},
		{Name: "TimeoutStopUSec", Value: dbus.MakeVariant(uint64(spec.Grace.Microseconds()))},
		// A timeout or a stop reaches every process of the run.
		{Name: "KillMode", Value: dbus.MakeVariant("control-group")},
		{Name: "SyslogIdentifier", Value: dbus.MakeVariant("chef-client")},
		{Name: "LogExtraFields", Value: dbus.MakeVariant([][]byte{[]byte("BOOTAGENT_RUN_ID=" + spec.ID)})},
	}
	if spec.EnvironmentFile != "" {
		// systemd reads the file as the unit starts; the unit's
		// properties name only its path.
		props = append(props, sddbus.Property{Name: "EnvironmentFiles", Value: dbus.MakeVariant([]struct {
			Path     string
			Optional bool
		}{{spec.EnvironmentFile, false}})})
	}
	done := make(chan string, 1)
	if _, err := conn.StartTransientUnitContext(ctx, name, "fail", props, done); err != nil {
		return Outcome{ID: spec.ID, Unit: name}, fmt.Errorf("start unit %s (%s): %w", name, strings.Join(spec.Command, " "), err)
	}
	select {
	case result := <-done:
		if result != "done" {
			return Outcome{ID: spec.ID, Unit: name}, fmt.Errorf("start unit %s (%s): job %s; see journalctl -u %s", name, strings.Join(spec.Command, " "), result, name)
		}
	case <-ctx.Done():
		if errors.Is(context.Cause(ctx), ErrEndRun) {
			return u.stop(Outcome{ID: spec.ID, Unit: name}, context.Cause(ctx))
		}
		return Outcome{ID: spec.ID, Unit: name}, ctx.Err()
	}
	spec.logger(u.log).Info("chef-client started", zap.String("unit", name), zap.Strings("command", spec.Command))
	return u.Follow(ctx, spec.ID)
}

// Running returns the ID of a run whose unit is still going, left by an
// earlier life of the agent, if there is one. It asks systemd only when a
// unit of a run is loaded at all: a boot's first start of the agent finds
// none, and does not wait for the bus.
func (u *UnitRunner) Running(ctx context.Context) (string, bool, error) {
	if !u.unitsLoaded() {
		return "", false, nil
	}
	// The dial is bounded on its own; ctx is the lookup's.
	<-u.ready
	conn, err := u.conn, u.err
	if err != nil {
		return "", false, err
	}
	units, err := conn.ListUnitsByPatternsContext(ctx, nil, []string{UnitPrefix + "*.service"})
	if err != nil {
		return "", false, fmt.Errorf("list chef-client units: %w", err)
	}
	for _, s := range units {
		if s.ActiveState == "activating" || s.ActiveState == "active" || s.ActiveState == "failed" || s.ActiveState == "deactivating" {
			id := strings.TrimSuffix(strings.TrimPrefix(s.Name, UnitPrefix), ".service")
			return id, true, nil
		}
	}
	return "", false, nil
}

// Follow waits for the run's unit to end, reads how it ended, and removes
// the unit. When ctx ends first, the unit is left running, unless the
// cause is ErrEndRun: then it is stopped, and followed to its end.
func (u *UnitRunner) Follow(ctx context.Context, id string) (Outcome, error) {
	name := UnitName(id)
	out := Outcome{ID: id, Unit: name}
	if _, err := u.connection(ctx); err != nil {
		return out, err
	}
	tick := time.NewTicker(unitPoll)
	defer tick.Stop()
	for {
		props, err := u.conn.GetUnitTypePropertiesContext(ctx, name, "Service")
		if err == nil {
			var unit map[string]any
			unit, err = u.conn.GetUnitPropertiesContext(ctx, name)
			if err == nil {
				active, _ := unit["ActiveState"].(string)
				sub, _ := unit["SubState"].(string)
				if active == "failed" || active == "inactive" || (active == "active" && sub == "exited") {
					return u.finish(ctx, out, active, props)
				}
			}
		}
		if errors.Is(context.Cause(ctx), ErrEndRun) {
			return u.stop(out, context.Cause(ctx))
		}
		if err != nil {
			return out, fmt.Errorf("read unit %s: %w", name, err)
		}
		select {
		case <-ctx.Done():
			if errors.Is(context.Cause(ctx), ErrEndRun) {
				return u.stop(out, context.Cause(ctx))
			}
			return out, ctx.Err()
		case <-tick.C:
		}
	}
}

// unitsLoaded says whether systemd may have a unit of a run loaded, by
// its transient unit file. A directory that cannot be read may hold one.
func (u *UnitRunner) unitsLoaded() bool {
	entries, err := os.ReadDir(u.unitDir)
	if err != nil {
		return !errors.Is(err, fs.ErrNotExist)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), UnitPrefix) && strings.HasSuffix(e.Name(), ".service") {
			return true
		}
	}
	return false
}

// stop stops a run's unit, waits for the stop job (bounded by the unit's
// own TimeoutStopSec, after which systemd kills what is left), and reads
// how the run ended.
func (u *UnitRunner) stop(out Outcome, why error) (Outcome, error) {
	u.log.Warn("stopping chef-client's unit", zap.String("unit", out.Unit), zap.String("why", why.Error()))
	// The run's own context has ended; the stop gets one of its own.
	sctx, cancel := context.WithTimeout(context.Background(), stopWait)
	defer cancel()
	done := make(chan string, 1)
	if _, err := u.conn.StopUnitContext(sctx, out.Unit, "replace", done); err != nil {
		return out, fmt.Errorf("stop unit %s: %w", out.Unit, err)
	}
	// The unit's TimeoutStopSec is the run's grace; a cause that says by
	// when the run must be over shortens it.
	killAt := time.After(graceFor(why, stopWait, time.Now()))
	for stopped := false; !stopped; {
		select {
		case <-done:
			stopped = true
		case <-killAt:
			u.log.Warn("chef-client's unit outlived the time it had; sending SIGKILL to it", zap.String("unit", out.Unit))
			if err := u.conn.KillUnitWithTarget(sctx, out.Unit, sddbus.All, int32(syscall.SIGKILL)); err != nil {
				u.log.Warn("could not kill chef-client's unit", zap.String("unit", out.Unit), zap.Error(err))
			}
			killAt = nil
		case <-sctx.Done():
			return out, fmt.Errorf("stop unit %s: %w", out.Unit, sctx.Err())
		}
	}
	props, err := u.conn.GetUnitTypePropertiesContext(sctx, out.Unit, "Service")
	if err != nil {
		return out, fmt.Errorf("read unit %s: %w", out.Unit, err)
	}
	unit, err := u.conn.GetUnitPropertiesContext(sctx, out.Unit)
	if err != nil {
		return out, fmt.Errorf("read unit %s: %w", out.Unit, err)
	}
	active, _ := unit["ActiveState"].(string)
	return u.finish(sctx, out, active, props)
}

// stopWait bounds the wait for a run's unit to stop: its TimeoutStopSec
// (the runs' grace) and a margin for systemd's own work.
const stopWait = time.Minute

// Exit codes of a unit's main process, as systemd reports them (siginfo's
// si_code).
const (
	cldExited = 1
	cldKilled = 2
	cldDumped = 3
)

func (u *UnitRunner) finish(ctx context.Context, out Outcome, active string, props map[string]any) (Outcome, error) {
	code, _ := props["ExecMainCode"].(int32)
	status, _ := props["ExecMainStatus"].(int32)
	result, _ := props["Result"].(string)
	start, _ := props["ExecMainStartTimestamp"].(uint64)
	exit, _ := props["ExecMainExitTimestamp"].(uint64)
	if start > 0 {
		out.Start = time.UnixMicro(int64(start))
		if exit > start {
			out.Duration = time.Duration(exit-start) * time.Microsecond
		}
	}
	switch code {
	case cldExited:
		out.ExitCode = int(status)
		out.Result = ResultOf(out.ExitCode)
	case cldKilled, cldDumped:
		out.ExitCode = -1
		out.Signal = syscall.Signal(status).String()
		out.Result = ResultKilled
	}
	if result == "timeout" {
		out.Result = ResultTimeout
	}
	var err error
	switch active {
	case "failed":
		err = u.conn.ResetFailedUnitContext(ctx, out.Unit)
	case "active":
		_, err = u.conn.StopUnitContext(ctx, out.Unit, "replace", nil)
	}
	if err != nil {
		u.log.Warn("could not remove the finished chef-client unit", zap.String("unit", out.Unit), zap.Error(err))
	}
	return out, nil
}
