package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/hostname"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/metrics"
)

// The daemon's state has one owner, the machine. Workers (the bootstrap,
// the registration, chef-client runs, polls, the deregistration) and the
// clock and signals tell it events; it changes the facts it holds and
// answers with the actions to take, which its driver (life) carries out.
// It does no I/O and reads no clock of its own, so any order of events can
// be played on it (machine_test.go plays thousands). The phase, the status
// line and READY are derived from the facts, never set.

// event is what the machine is told.
type event interface{ isEvent() }

type (
	// evStart begins a life; run is a chef-client run going on from
	// before it (an earlier life of this process, or a unit left by an
	// agent that restarted).
	evStart struct{ run *runInfo }
	// evIdentified: IMDS answered with the instance's identity.
	evIdentified struct{ identity imds.Identity }
	// evNaming: the bootstrap is applying this name.
	evNaming struct{ name hostname.Name }
	evBooted struct{ b booted }
	// evBootFailed: the bootstrap failed; it is tried again later unless
	// its input is invalid.
	evBootFailed struct{ err error }
	evRegistered struct {
		reg  chef.Registered
		took time.Duration
	}
	evRegisterFailed struct{ err error }
	evRunEnded       struct {
		out chef.Outcome
		err error
	}
	// evPolled is one poll: the drift check and IMDS's notices.
	evPolled struct {
		changes  []hostname.Change
		driftErr error
		notices  imds.Reading
	}
	// evNodeDeleted: a deregistration deleted the node. The client is
	// next, once the driver closed saved: the node's deletion is then on
	// disk, so that a crash after the client's cannot leave a state that
	// thinks its key still opens anything.
	evNodeDeleted struct{ saved chan struct{} }
	// evDeregistered: the deregistration ended with d for the current
	// node, err for anything left, and formerLeft the former nodes still on
	// the server.
	evDeregistered struct {
		d          chef.Deregistered
		err        error
		formerLeft []string
	}
	// evTick: time passed (a timer the machine asked for, or a heartbeat).
	evTick struct{}
	// evTrigger: a chef-client run was asked for (SIGUSR1).
	evTrigger struct{}
	// evStop: the agent is asked to stop (SIGTERM).
	evStop struct{}
	// evReload: a reload ends this life once the registration going (if
	// any) has answered.
	evReload struct{}
)

func (evStart) isEvent()          {}
func (evIdentified) isEvent()     {}
func (evNaming) isEvent()         {}
func (evBooted) isEvent()         {}
func (evBootFailed) isEvent()     {}
func (evRegistered) isEvent()     {}
func (evRegisterFailed) isEvent() {}
func (evRunEnded) isEvent()       {}
func (evPolled) isEvent()         {}
func (evNodeDeleted) isEvent()    {}
func (evDeregistered) isEvent()   {}
func (evTick) isEvent()           {}
func (evTrigger) isEvent()        {}
func (evStop) isEvent()           {}
func (evReload) isEvent()         {}

// action is what the machine asks its driver to do.
type action interface{ isAction() }

type (
	// actBoot starts the bootstrap; previous is the instance the state
	// describes.
	actBoot     struct{ previous string }
	actRegister struct{ plan *plan }
	actRun      struct {
		run     runInfo
		plan    *plan
		timeout time.Duration
	}
	// actEndRun ends the run going, for cause (which may wrap
	// chef.ErrEndRun).
	actEndRun struct{ cause error }
	// actStopRegister ends the registration going before its next
	// request; the request going is answered, so that the registration
	// reports what the server made.
	actStopRegister struct{}
	// actPoll reads IMDS's notices and, unless noticesOnly, checks the
	// host name.
	actPoll struct {
		plan        *plan
		noticesOnly bool
	}
	// actDeregister deletes the former nodes, then the current one
	// (unless it is gone already).
	actDeregister struct {
		cfg      config.Config
		log      *zap.Logger
		current  *chef.Leaving
		former   []string
		deadline time.Time
	}
	actStatus struct{ status string }
	actReady  struct{ status string }
	// actExit ends the life (once: the command) with err.
	actExit struct{ err error }
)

func (actBoot) isAction()         {}
func (actRegister) isAction()     {}
func (actRun) isAction()          {}
func (actEndRun) isAction()       {}
func (actStopRegister) isAction() {}
func (actPoll) isAction()         {}
func (actDeregister) isAction()   {}
func (actStatus) isAction()       {}
func (actReady) isAction()        {}
func (actExit) isAction()         {}

// runInfo is a chef-client run the machine knows to be going.
type runInfo struct {
	id string
	// first runs with the first-boot JSON.
	first bool
	// final is the last run before deregistration (chef.final_run).
	final   bool
	started time.Time
}

// Timing of the termination and of a stop.
const (
	// deregisterReserve is the part of a termination notice's time kept
	// for deleting the node and client.
	deregisterReserve = 30 * time.Second
	// endRunReserve is what a chef-client run going must leave of the
	// notice when it is ended: its SIGTERM grace, and the deletions'
	// reserve. A final run gets what is left before it.
	endRunReserve = runGrace + deregisterReserve
	// minFinalRun is the least time a final chef-client run is worth
	// starting with.
	minFinalRun = 30 * time.Second
	// stopGrace bounds a stop that waits for a deregistration or the end
	// of a run: chef-client's SIGTERM grace and a margin, well inside
	// systemd's default TimeoutStopSec of 90s.
	stopGrace = runGrace + 10*time.Second
	// stopDeletes is the part of the stop's grace kept for the deletions.
	stopDeletes = 10 * time.Second
	// pollBudget is the most a poll's requests take when IMDS does not
	// answer them (four notices, each bounded by the client's timeouts),
	// and the IMDS filter's check when netlink does not (six exchanges of
	// filterTimeout at most).
	pollBudget = 5*time.Second + 6*filterTimeout
)

// bootstrapRetry paces retries of a failed bootstrap or registration:
// soon at first, then no more than every five minutes, so that a fleet
// whose IMDS or Chef server hiccupped recovers quickly without hammering
// anything.
var bootstrapRetry = backoff.Policy{Initial: time.Second, Max: 5 * time.Minute, Jitter: 0.5}

// errStopping is why a run is stopped when the agent stops.
var errStopping = errors.New("the agent is stopping")

// failure is the last failed attempt at a step, and when it is tried again.
type failure struct {
	err   error
	retry time.Duration
	// human is true when a person must fix something first.
	human bool
}

// machineOptions are what a machine needs besides the state.
type machineOptions struct {
	log     *zap.Logger
	metrics *metrics.Metrics
	version string
	// cfg is the baked configuration of this life; the plan holds the one
	// with user-data over it.
	cfg  config.Config
	once bool
	// started is when the agent started, the origin of the timeline
	// metrics.
	started  time.Time
	clock    backoff.Clock
	newRunID func(time.Time) string
	retry    func(backoff.Policy) backoff.Policy
}

// machine holds the facts and decides. See the comment at the top.
type machine struct {
	machineOptions

	// st is the persisted part of the facts.
	st State

	// This life's facts.
	identified bool
	plan       *plan
	naming     hostname.Name
	keyPresent bool
	booting    bool
	bootAt     time.Time
	bootRetry  *backoff.Backoff
	// registering is true while a registration worker runs; regStopping
	// once it was asked to stop.
	registering, regStopping bool
	regAt                    time.Time
	regRetry                 *backoff.Backoff
	run                      *runInfo
	runEnding                bool
	// due is when the next scheduled run starts; zero until planned.
	due      time.Time
	runRetry *backoff.Backoff
	polling  bool
	pollAt   time.Time
	// pollStarted is when the poll going began, to tell a stuck one.
	pollStarted   time.Time
	deregistering bool
	// deregTried is true once this life made its deregistration (a
	// restart resumes what one left), and stopTried once the stop made one
	// more.
	deregTried, stopTried bool
	wasWarm               bool
	stopping              bool
	stopBy                time.Time
	// stopPoll is true once the stop's own poll started, stopPolled once
	// it ended.
	stopPoll, stopPolled bool
	// endCause is why the run going was ended; runLeft is true once a
	// stop left it to its unit (it goes on, and may save the node).
	endCause error
	runLeft  bool
	// reloading is true once a reload waits for the life to end.
	reloading      bool
	failure        *failure
	ready          bool
	exit           *actExit
	exitSent       bool
	shownPhase     Phase
	shownStatus    string
	said           map[string]bool
	drift          repeatLog
	bootFailures   repeatLog
	regFailures    repeatLog
	noticeFailures map[string]*repeatLog
	// res is what `once` reports.
	res Result
}

func newMachine(o machineOptions, st State) *machine {
	m := &machine{machineOptions: o, st: st, shownPhase: -1, said: map[string]bool{}, noticeFailures: map[string]*repeatLog{}}
	m.bootRetry = backoff.New(m.retry(bootstrapRetry), o.clock)
	m.regRetry = backoff.New(m.retry(bootstrapRetry), o.clock)
	m.drift = repeatLog{log: m.log, msg: "hostname check failed", recovered: "hostname check works again"}
	m.bootFailures = repeatLog{log: m.log, msg: "bootstrap failed; retrying", recovered: "bootstrap succeeded after failures"}
	m.regFailures = repeatLog{log: m.log, msg: "registration failed; retrying", recovered: "registration succeeded after failures"}
	if r := st.LastRun; r != nil && st.LastSuccess == nil && !r.Result.Failed() {
		// A state from before the last success was recorded.
		start := r.Start.UTC()
		m.st.LastSuccess = &start
	}
	m.showRuns()
	return m
}

// showRuns sets the run metrics from the state, so that a restarted agent
// says when the last runs were, not that there were none.
func (m *machine) showRuns() {
	if r := m.st.LastRun; r != nil {
		m.metrics.LastRunTimestamp.Set(float64(r.Start.UnixNano()) / 1e9)
		m.metrics.LastRunDuration.Set(r.Duration.Seconds())
		m.metrics.LastRunExitCode.Set(float64(r.ExitCode))
	}
	if t := m.st.LastSuccess; t != nil {
		m.metrics.LastSuccessTimestamp.Set(float64(t.UnixNano()) / 1e9)
	}
	m.metrics.FailingSince.Set(0)
	if t := m.st.FailingSince; t != nil {
		m.metrics.FailingSince.Set(float64(t.UnixNano()) / 1e9)
	}
	if t := m.st.NextRun; t != nil {
		m.metrics.NextRunTimestamp.Set(float64(t.UnixNano()) / 1e9)
	}
}

// step applies one event and returns what to do about it.
func (m *machine) step(now time.Time, ev event) []action {
	m.apply(now, ev)
	acts := m.next(now)
	return append(acts, m.view()...)
}

// apply changes the facts by what ev says.
func (m *machine) apply(now time.Time, ev event) {
	switch ev := ev.(type) {
	case evStart:
		m.takeRun(ev.run)
	case evIdentified:
		m.identified = true
		m.identify(ev.identity)
	case evNaming:
		m.naming = ev.name
	case evBooted:
		m.booted(now, ev.b)
	case evBootFailed:
		m.booting = false
		if errors.Is(ev.err, config.ErrInvalid) {
			// Retrying cannot fix bad input: the daemon ends, and systemd
			// does not restart it (RestartPreventExitStatus=2).
			m.failure = &failure{err: ev.err, human: true}
			m.exit = &actExit{err: ev.err}
			return
		}
		if m.fail(ev.err, m.bootRetry, &m.bootFailures) {
			m.bootAt = now.Add(m.failure.retry)
		}
	case evRegistered:
		m.registered(now, ev)
	case evRegisterFailed:
		m.registering = false
		if m.regStopping || m.stopping {
			m.regStopping = false
			m.log.Info("the registration was stopped", zap.Error(ev.err))
			return
		}
		if m.fail(ev.err, m.regRetry, &m.regFailures) {
			m.regAt = now.Add(m.failure.retry)
		}
	case evRunEnded:
		m.runEnded(now, ev)
	case evPolled:
		m.polled(now, ev)
	case evNodeDeleted:
		if d := m.st.Deregistration; d != nil {
			d.NodeDeleted = true
		}
	case evDeregistered:
		m.deregistering = false
		rec := deregistrationRecord(now, m.st.NodeName, m.st.Termination.Reason, ev)
		logDeregistration(m.log, m.metrics, m.st.NodeName, rec)
		m.st.Deregistration, m.st.FormerNodes = &rec, ev.formerLeft
	case evTrigger:
		m.triggered(now)
	case evStop:
		if !m.stopping {
			m.stopping, m.stopBy = true, now.Add(stopGrace)
		}
	case evReload:
		m.reloading = true
	case evTick:
	}
}

// takeRun takes the run going at the start of a life, if any. The state
// says what it was (the first-boot run, the final run) when it started it;
// a run the state names that is not going any more ended with the agent (a
// child process dies with it).
func (m *machine) takeRun(run *runInfo) {
	if run == nil {
		m.st.Run = nil
		return
	}
	r := *run
	if g := m.st.Run; g != nil && g.ID == r.id {
		r.first, r.final, r.started = g.First, g.Final, g.Started
	}
	m.run = &r
}

// identify takes the instance's identity. Another instance than the state
// describes (an image baked from a configured machine without `bootagent
// clean`) owns nothing of what the state says: the state starts afresh.
func (m *machine) identify(id imds.Identity) {
	m.log = m.log.With(zap.String("instance_id", id.InstanceID))
	m.drift.log, m.bootFailures.log, m.regFailures.log = m.log, m.log, m.log
	switch m.st.InstanceID {
	case id.InstanceID:
	case "":
		// A first boot: what was noticed before IMDS named the instance
		// (the stop's poll may come first) is this instance's.
		m.st.InstanceID = id.InstanceID
	default:
		m.st = State{Version: stateVersion, InstanceID: id.InstanceID, Boot: m.st.Boot}
		// The runs shown were another instance's.
		for _, g := range []prometheus.Gauge{m.metrics.LastRunTimestamp, m.metrics.LastRunDuration, m.metrics.LastRunExitCode, m.metrics.LastSuccessTimestamp, m.metrics.FailingSince, m.metrics.NextRunTimestamp, m.metrics.RunPeriod} {
			g.Set(0)
		}
	}
	m.res.Identity = id
	m.metrics.Info.Reset()
	m.metrics.Info.WithLabelValues(m.version, id.InstanceID).Set(1)
}

func (m *machine) booted(now time.Time, b booted) {
	m.booting, m.failure = false, nil
	m.bootRetry.Reset()
	m.bootFailures.ok()
	if !m.identified {
		m.identified = true
		m.identify(b.identity)
	}
	p := b.plan
	m.plan, m.keyPresent = p, b.keyPresent
	m.st.Hostname, m.st.HostnameSource = p.name.String(), p.source
	m.st.Boot = Boot{Started: b.started.UTC(), Steps: b.steps}
	for _, s := range b.steps {
		if s.Name == "imds" || s.Name == "hostname" {
			m.milestone(s.Name, b.started.Add(s.Offset+s.Duration))
		}
	}
	m.res.UserData, m.res.Hostname, m.res.HostnameSource, m.res.Changes, m.res.Steps = p.info, p.name, p.source, b.changes, b.steps
	// The period of the runs this life schedules: none without a Chef
	// server, with chef.exec false, or in once (a reload may change it).
	m.metrics.RunPeriod.Set(0)
	if p.chef == nil {
		return
	}
	m.res.NodeName = p.chef.nodeName
	if p.cfg.Chef.Exec && !m.once {
		m.metrics.RunPeriod.Set(m.period().Seconds())
	}
	if b.lifecycleErr != nil {
		m.log.Warn("could not read the Auto Scaling lifecycle state; going on with the last one known", zap.String("lifecycle_state", m.notices().LifecycleState), zap.Error(b.lifecycleErr))
	} else {
		n := m.notices()
		n.LifecycleState = b.lifecycle
		m.noticed(now, n)
	}
	if m.st.NodeName == "" && b.keyPresent {
		// The node's key is there, but the state names no node (it was
		// damaged, or lost): a registration may have made the node this
		// plan names, with that key. Taken as begun, it is completed, or
		// removed at termination.
		m.log.Warn("the node's key is on disk, but the state names no node (damaged or lost?): taking the configured one as registered before",
			zap.String("node_name", p.chef.nodeName))
		m.st.NodeName, m.st.ClientName = p.chef.nodeName, p.chef.nodeName
	}
	if m.notices().Warmed() && !m.isRegistered() {
		m.res.Warmed = m.notices().LifecycleState
		m.wasWarm = true
		m.log.Info("in a warm pool: named, registration waits until the instance goes into service", zap.String("lifecycle_state", m.res.Warmed))
	}
	if m.isRegistered() {
		m.res.AlreadyRegistered = true
		m.log.Info("already registered; registration skipped", zap.String("node_name", p.chef.nodeName), zap.Time("registered_at", *m.st.RegisteredAt))
	}
}

func (m *machine) registered(now time.Time, ev evRegistered) {
	m.registering, m.regStopping, m.failure = false, false, nil
	m.regRetry.Reset()
	m.regFailures.ok()
	at := now.UTC()
	m.st.RegisteredAt = &at
	m.keyPresent = true
	detail := ""
	if ev.reg.Retries > 0 {
		detail = fmt.Sprintf("%d Chef server requests retried", ev.reg.Retries)
	}
	m.st.Boot.Steps = append(m.st.Boot.Steps, Step{Name: "register", Offset: now.Add(-ev.took).Sub(m.st.Boot.Started), Duration: ev.took, Detail: detail})
	m.res.Registered, m.res.Steps = ev.reg, m.st.Boot.Steps
	m.milestone("registered", now)
}

// fail records a failed bootstrap or registration and reports whether it
// is to be tried again (not in `once`, which ends with it).
func (m *machine) fail(err error, b *backoff.Backoff, rl *repeatLog) bool {
	if m.stopping && errors.Is(err, context.Canceled) {
		return false
	}
	if m.once {
		m.failure = &failure{err: err, human: true}
		m.exit = &actExit{err: err}
		return false
	}
	delay := b.Next()
	m.failure = &failure{err: err, retry: delay, human: needsHuman(err)}
	rl.fail(err, zap.Duration("retry_in", delay))
	return true
}

func (m *machine) runEnded(now time.Time, ev evRunEnded) {
	r := m.run
	m.run, m.runEnding = nil, false
	if r == nil {
		return
	}
	if ev.err != nil && m.stopping && !errors.Is(m.endCause, chef.ErrEndRun) {
		// Left to its unit, which goes on without the agent.
		m.runLeft = true
	}
	log := m.runLog(r.id)
	if ev.err == nil || !m.stopping {
		// A run that ended, or that could not start, is over: only the
		// stop of the agent leaves one going (a unit, followed again by
		// the next start).
		m.st.Run = nil
	}
	if r.final && m.st.Termination != nil {
		// Made, or failed to start: never tried again, so that the
		// deletions keep their time.
		m.st.Termination.FinalRunDone = true
	}
	if ev.err != nil {
		if m.once {
			m.failure = &failure{err: fmt.Errorf("chef-client run %s: %w", r.id, ev.err), human: true}
			m.exit = &actExit{err: m.failure.err}
			return
		}
		if m.stopping || m.plan == nil || m.st.Termination != nil {
			log.Warn("chef-client run did not happen", zap.Error(ev.err))
			return
		}
		m.due = now.Add(m.runBackoff().Next())
		log.Warn("chef-client run did not happen", zap.Error(ev.err), zap.Time("next_run", m.due))
		m.setNextRun(m.due)
		return
	}
	out := ev.out
	m.metrics.Runs.WithLabelValues(string(out.Result)).Inc()
	m.st.LastRun = &out
	start := out.Start.UTC()
	switch {
	case !out.Result.Failed():
		m.st.LastSuccess, m.st.FailingSince = &start, nil
	case m.st.FailingSince == nil:
		m.st.FailingSince = &start
	}
	m.showRuns()
	if r.first {
		m.milestone("first_converge", now)
		if !out.Result.Failed() {
			m.st.FirstRunDone = true
		}
	}
	fields := []zap.Field{zap.String("result", string(out.Result)), zap.Int("exit_code", out.ExitCode), zap.Duration("duration", out.Duration)}
	if fix := out.Result.Fix(); fix != "" {
		fields = append(fields, zap.String("fix", fix))
	}
	if out.Result.Failed() {
		log.Warn("chef-client run failed", append(fields, zap.String("signal", out.Signal), zap.Strings("tail", out.Tail))...)
	} else {
		log.Info("chef-client run finished", fields...)
	}
	if m.once {
		m.res.FirstRun = &out
		m.exit = &actExit{}
		if out.Result.Failed() {
			m.failure = &failure{err: fmt.Errorf("chef-client run %s: %s (exit code %d)%s%s", out.ID, out.Result, out.ExitCode, fixText(out.Result), tailText(out.Tail)), human: true}
			m.exit.err = m.failure.err
		}
		return
	}
	if m.stopping || m.st.Termination != nil || m.plan == nil {
		return
	}
	if out.Result.Failed() {
		m.due = now.Add(m.runBackoff().Next())
		log.Info("next chef-client run soon, after the failure", zap.Time("next_run", m.due))
	} else {
		m.runBackoff().Reset()
		log.Info("next chef-client run", zap.Time("next_run", m.due))
	}
	m.setNextRun(m.due)
}

func (m *machine) polled(now time.Time, ev evPolled) {
	m.polling = false
	if m.stopPoll {
		m.stopPolled = true
	}
	for _, c := range ev.changes {
		m.log.Warn("hostname drift corrected", zap.String("what", c.What), zap.String("old", c.Old), zap.String("new", c.New))
		m.metrics.DriftCorrections.WithLabelValues(c.What).Inc()
	}
	switch {
	case ev.driftErr == nil:
		m.drift.ok()
	case !m.stopping:
		m.drift.fail(ev.driftErr)
	}
	for path, rl := range m.noticeFailures {
		if _, failed := ev.notices.Failed[path]; !failed {
			rl.ok()
		}
	}
	for path, err := range ev.notices.Failed {
		if m.stopping {
			break
		}
		rl := m.noticeFailures[path]
		if rl == nil {
			rl = &repeatLog{log: m.log.With(zap.String("path", path)), msg: "could not read an IMDS notice; the others are read and judged without it",
				recovered: "IMDS notice readable again"}
			m.noticeFailures[path] = rl
		}
		rl.fail(err)
	}
	m.noticed(now, ev.notices.Over(m.notices()))
}

// notices is what IMDS last announced.
func (m *machine) notices() imds.Notices {
	if m.st.Notices == nil {
		return imds.Notices{}
	}
	return *m.st.Notices
}

// noticed takes what IMDS announces now: each change is logged and
// counted once, and a termination is recorded, with its deadline.
func (m *machine) noticed(now time.Time, n imds.Notices) {
	last := m.notices()
	if m.st.Notices == nil || !noticesEqual(n, last) {
		noticeChanges(m.log, m.metrics, last, n)
		m.st.Notices = &n
	}
	if !n.Terminating() {
		return
	}
	deadline := terminationDeadline(n, now)
	if t := m.st.Termination; t != nil {
		if deadline.Before(t.Deadline) {
			t.Deadline = deadline
		}
		return
	}
	m.st.Termination = &Termination{NoticedAt: now.UTC(), Reason: terminationReason(n), Deadline: deadline.UTC()}
	m.log.Warn("the instance is terminating: no chef-client run starts from now on", zap.String("reason", m.st.Termination.Reason), zap.Time("deadline", deadline))
}

func (m *machine) triggered(now time.Time) {
	switch why := m.noRun(); {
	case m.run != nil:
		m.runLog(m.run.id).Warn("chef-client run skipped: the previous run is still going", zap.String("trigger", "requested"))
	case why != "":
		m.log.Info("chef-client run requested, but none starts now", zap.String("why", why))
	default:
		m.due = now
	}
}

// noRun says why no chef-client run may start now, or "".
func (m *machine) noRun() string {
	switch {
	case m.stopping:
		return "the agent is stopping"
	case m.st.Termination != nil:
		return "the instance is terminating"
	case m.deregistered():
		return "the instance is deregistered"
	case m.plan == nil:
		return "the bootstrap is not done"
	case m.plan.chef == nil:
		return "no Chef server is configured"
	case !m.isRegistered():
		return "the instance is not registered yet"
	case !m.plan.cfg.Chef.Exec:
		return "chef.exec is false: the agent registers the node and writes chef-client's files, and runs nothing"
	case m.notices().Warmed():
		return "the instance is in a warm pool"
	}
	return ""
}

// deregistered reports whether a deregistration took the node: no run and
// no registration may make it again (one by hand may have left the client).
func (m *machine) deregistered() bool {
	return m.st.Deregistration != nil && m.st.Deregistration.NodeDeleted
}

// isRegistered reports whether this plan's node is registered, with its
// key on disk.
func (m *machine) isRegistered() bool {
	return m.plan != nil && m.plan.chef != nil && m.st.NodeName == m.plan.chef.nodeName && m.st.RegisteredAt != nil && m.keyPresent
}

// bootstrapped reports what READY=1 promises: the name applied and the
// instance registered, or with nothing to register for now.
func (m *machine) bootstrapped() bool {
	return m.plan != nil && (m.plan.chef == nil || m.isRegistered() || m.notices().Warmed() || m.st.Termination != nil || m.st.Deregistration.Complete())
}

// next decides what to do, from the facts as they are now.
func (m *machine) next(now time.Time) []action {
	if m.exit != nil {
		if m.exitSent {
			return nil
		}
		m.exitSent = true
		return []action{*m.exit}
	}
	if m.stopping {
		return m.nextStopping(now)
	}
	if m.reloading && m.registering && !m.regStopping {
		// A request cut off might still be carried out by the server,
		// unknown to the next life: the registration is asked to stop
		// before its next request, and its answer is waited for.
		m.regStopping = true
		m.log.Info("stopping the registration: a reload waits for its answer", zap.String("node_name", m.st.NodeName))
		return []action{actStopRegister{}}
	}
	if m.plan == nil {
		if m.booting || now.Before(m.bootAt) {
			return nil
		}
		m.booting, m.naming = true, hostname.Name{}
		m.st.Boot = Boot{Started: now.UTC()}
		return []action{actBoot{previous: m.st.InstanceID}}
	}
	if m.once {
		return m.nextOnce(now)
	}
	var acts []action
	if !m.polling && !now.Before(m.pollAt) {
		m.polling, m.pollStarted, m.pollAt = true, now, now.Add(m.cfg.IMDS.PollInterval.D())
		acts = append(acts, actPoll{plan: m.plan})
	}
	switch {
	case m.st.Termination != nil:
		return append(acts, m.nextTerminating(now)...)
	case m.plan.chef == nil || m.deregistered():
		return acts
	case !m.isRegistered():
		return append(acts, m.nextRegistration(now)...)
	case !m.plan.cfg.Chef.Exec:
		return acts
	}
	return append(acts, m.nextRun(now)...)
}

func (m *machine) nextRegistration(now time.Time) []action {
	if m.registering || m.reloading || m.notices().Warmed() || now.Before(m.regAt) {
		return nil
	}
	if m.wasWarm {
		m.wasWarm = false
		m.log.Info("the instance left the warm pool and is in service: registering", zap.String("lifecycle_state", m.notices().LifecycleState))
	}
	node := m.plan.chef.nodeName
	m.registering = true
	if old := m.st.NodeName; old != "" && old != node {
		// The node name changed (chef.node_name, or the name it is made
		// of): a new node is registered with the same key, and the old
		// one is remembered, to be removed at termination.
		m.log.Warn("the node name changed: registering a new node; the old one stays on the Chef server until the instance terminates",
			zap.String("node_name", node), zap.String("old_node_name", old),
			zap.String("fix", fmt.Sprintf("knife node delete %s -y; knife client delete %s -y", old, old)))
		if !slices.Contains(m.st.FormerNodes, old) {
			m.st.FormerNodes = append(m.st.FormerNodes, old)
		}
		m.st.RegisteredAt = nil
	}
	// Recorded before the first request: a termination from now on
	// removes whatever the registration got to make, and clean the files
	// it got to write.
	m.st.NodeName, m.st.ClientName = node, node
	for _, f := range []string{m.plan.cfg.Chef.ClientKey, m.plan.cfg.Chef.FirstBootPath} {
		if !slices.Contains(m.st.InstanceFiles, f) {
			m.st.InstanceFiles = append(m.st.InstanceFiles, f)
		}
	}
	return []action{actRegister{plan: m.plan}}
}

func (m *machine) nextRun(now time.Time) []action {
	if m.notices().Warmed() {
		return nil
	}
	if m.due.IsZero() {
		m.due = m.firstDue(now)
		m.setNextRun(m.due)
	}
	if now.Before(m.due) {
		return nil
	}
	if m.run != nil {
		m.due = now.Add(m.period())
		m.runLog(m.run.id).Warn("chef-client run skipped: the previous run is still going", zap.String("trigger", "scheduled"), zap.Time("next_run", m.due))
		m.setNextRun(m.due)
		return nil
	}
	m.due = now.Add(m.period())
	m.setNextRun(m.due)
	return []action{m.startRun(now, false, m.plan.cfg.Chef.RunTimeout.D())}
}

// runBackoff paces the retries of failed runs: from a minute, capped at
// the interval, so that a failure is retried sooner than the schedule.
func (m *machine) runBackoff() *backoff.Backoff {
	if m.runRetry == nil {
		interval := m.plan.cfg.Chef.Interval.D()
		m.runRetry = backoff.New(m.retry(backoff.Policy{Initial: min(time.Minute, interval), Max: interval, Jitter: 0.5}), m.clock)
	}
	return m.runRetry
}

// firstDue is when the first run of a life is due: at once on a first
// boot, else when the schedule the agent had says (a restart does not make
// a run), and an interval after a run going on from before.
func (m *machine) firstDue(now time.Time) time.Time {
	switch next := m.st.NextRun; {
	case m.run != nil:
		return now.Add(m.period())
	case m.st.FirstRunDone && next != nil && next.After(now):
		m.log.Info("keeping the chef-client schedule", zap.Time("next_run", *next))
		return *next
	default:
		return now
	}
}

// period is the time between two runs: the interval and this instance's
// splay.
func (m *machine) period() time.Duration {
	ch := m.plan.cfg.Chef
	return ch.Interval.D() + splayFor(m.st.InstanceID, ch.Splay.D())
}

func (m *machine) startRun(now time.Time, final bool, timeout time.Duration) action {
	r := runInfo{id: m.newRunID(now), first: !m.st.FirstRunDone, final: final, started: now}
	m.run = &r
	m.st.Run = &RunGoing{ID: r.id, First: r.first, Final: r.final, Started: now.UTC()}
	m.runLog(r.id).Info("chef-client run starting", zap.Bool("first_boot", r.first), zap.Bool("final", final))
	return actRun{run: r, plan: m.plan, timeout: timeout}
}

func (m *machine) nextOnce(now time.Time) []action {
	switch {
	case m.plan.chef == nil || m.notices().Warmed() || m.st.Termination != nil:
		if t := m.st.Termination; t != nil && !m.isRegistered() {
			m.res.Terminating = t.Reason
		}
		m.exit = &actExit{}
		return m.next(now)
	case !m.isRegistered():
		return m.nextRegistration(now)
	case !m.plan.cfg.Chef.Exec:
		m.exit = &actExit{}
		return m.next(now)
	case m.run == nil && m.res.FirstRun == nil:
		return []action{m.startRun(now, false, m.plan.cfg.Chef.RunTimeout.D())}
	}
	return nil
}

// nextTerminating orders the end: no run starts; a registration going is
// stopped; a run going finishes while the deletions keep their time, and
// is ended otherwise; then the final run, if asked for and there is time;
// then the node and client are deleted.
func (m *machine) nextTerminating(now time.Time) []action {
	t := m.st.Termination
	if m.registering {
		if m.regStopping {
			return nil
		}
		m.regStopping = true
		m.log.Info("stopping the registration: the instance is terminating", zap.String("node_name", m.st.NodeName))
		return []action{actStopRegister{}}
	}
	ch := m.plan.cfg.Chef
	if !m.mayDeregister() {
		// A run going finishes: nothing needs its time.
		switch {
		case m.st.NodeName == "":
			m.sayOnce("nothing-registered", func() {
				m.log.Info("the instance is terminating; it was never registered, so nothing is left to remove", zap.String("reason", t.Reason))
			})
		case !ch.Enabled():
			m.sayOnce("kept", func() {
				m.log.Warn("the instance is terminating; no Chef server is configured any more (chef.server_url), so its node and client stay on the one it registered with",
					zap.String("reason", t.Reason), zap.String("node_name", m.st.NodeName))
			})
		default:
			m.sayOnce("kept", func() {
				m.log.Warn("the instance is terminating; chef.deregister_on_termination is off, so its node and client stay on the Chef server",
					zap.String("reason", t.Reason), zap.String("node_name", m.st.NodeName))
			})
		}
		return nil
	}
	if m.run != nil {
		// The final run's timeout ends it in time, unless the deadline
		// moved closer since (a spot notice after an Auto Scaling one).
		if m.runEnding {
			return nil
		}
		endBy := t.Deadline.Add(-endRunReserve)
		log := m.runLog(m.run.id)
		if now.Before(endBy) {
			m.sayOnce("run-finishes", func() {
				log.Info("the chef-client run going may finish before the deregistration", zap.Time("until", endBy))
			})
			return nil
		}
		m.runEnding = true
		cause := &chef.EndRun{Why: "the instance terminates at " + t.Deadline.Format(time.RFC3339) + " and deregistering needs the time left",
			By: t.Deadline.Add(-deregisterReserve)}
		log.Warn("ending the chef-client run", zap.String("why", cause.Error()))
		return []action{actEndRun{cause: cause}}
	}
	if ch.FinalRun && ch.Exec && !t.FinalRunDone && m.isRegistered() && !m.deregistered() {
		left := t.Deadline.Sub(now) - endRunReserve
		if left >= minFinalRun {
			m.log.Info("a final chef-client run before deregistering", zap.Duration("within", left))
			return []action{m.startRun(now, true, min(left, ch.RunTimeout.D()))}
		}
		m.log.Warn("no time for a final chef-client run before deregistering", zap.Duration("left", left+endRunReserve))
		t.FinalRunDone = true
	}
	if m.deregTried {
		return nil
	}
	return m.startDeregister(now)
}

// startDeregister starts the deletion of the node and client, resuming one
// an earlier life left unfinished, unless there is nothing (more) to do.
func (m *machine) startDeregister(now time.Time) []action {
	d, t := m.st.Deregistration, m.st.Termination
	// A refusal of this termination's deletions waits for a person; one of
	// a deregistration by hand does not stop the termination's.
	if m.deregistering || d.Complete() || (d != nil && d.Refused && d.Reason == t.Reason) {
		return nil
	}
	var current *chef.Leaving
	nodeGone := d != nil && d.NodeDeleted
	if d == nil || !d.NodeDeleted || !d.ClientDeleted {
		current = &chef.Leaving{Name: m.st.NodeName, KeyPath: m.plan.cfg.Chef.ClientKey, Confirmed: m.st.RegisteredAt != nil, NodeGone: nodeGone,
			Resumed: d != nil && d.InProgress}
	}
	m.deregTried, m.deregistering = true, true
	// No final run comes after the deletions, whatever ends them.
	t.FinalRunDone = true
	m.st.Deregistration = &Deregistration{At: now.UTC(), Reason: t.Reason, InProgress: true,
		Deregistered: chef.Deregistered{NodeDeleted: nodeGone, ClientDeleted: current == nil}}
	m.log.Warn("the instance is terminating: deregistering from the Chef server", zap.String("reason", t.Reason),
		zap.Time("deadline", t.Deadline), zap.String("node_name", m.st.NodeName), zap.Strings("former_nodes", m.st.FormerNodes))
	return []action{actDeregister{cfg: m.plan.cfg, log: m.log, current: current, former: m.st.FormerNodes, deadline: t.Deadline}}
}

// nextStopping ends the life: a run going is stopped (a unit is left to
// finish, unless the instance is terminating), so is a registration, a
// terminating instance deletes its node and client first, and the machine
// exits once nothing it waits for is going, or the stop's grace is over.
func (m *machine) nextStopping(now time.Time) []action {
	var acts []action
	if m.registering && !m.regStopping {
		m.regStopping = true
		acts = append(acts, actStopRegister{})
	}
	// IMDS has its say first: a termination announced since the last poll
	// (the shutdown of an Auto Scaling termination follows it closely)
	// decides whether the run going is ended and the node deleted.
	if !m.stopPolled && !m.once && now.Before(m.stopBy) {
		if !m.polling {
			m.polling, m.pollStarted, m.stopPoll = true, now, true
			acts = append(acts, actPoll{plan: m.plan, noticesOnly: true})
		}
		return acts
	}
	terminating := m.st.Termination != nil
	if m.run != nil && !m.runEnding {
		m.runEnding = true
		cause := errStopping
		if terminating {
			// The deletions that follow keep the end of the stop's grace.
			cause = &chef.EndRun{Why: "the agent is stopping and the instance is terminating", By: m.stopBy.Add(-stopDeletes)}
		}
		m.endCause = cause
		acts = append(acts, actEndRun{cause: cause})
	}
	// A registration and a run going are waited for: what the
	// registration made is then on the server, for the deregistration to
	// remove, and no chef-client saves the node after it is deleted.
	if terminating && m.runLeft {
		m.sayOnce("run-left", func() {
			m.log.Warn("the instance is terminating, but a chef-client run goes on in its unit: the next start of the agent deregisters after it")
		})
	}
	if terminating && !m.runLeft && !m.registering && m.run == nil && !m.stopTried && !m.deregistering && m.mayDeregister() {
		// However this life's deregistration went, the stop of a
		// terminating instance makes one more, since no other comes.
		m.stopTried = true
		if d := m.startDeregister(now); d != nil {
			m.log.Info("stopping: deregistering first", zap.Duration("at_most", m.stopBy.Sub(now)))
			acts = append(acts, d...)
		}
	}
	if (m.deregistering || m.run != nil || m.registering) && now.Before(m.stopBy) {
		return acts
	}
	m.exit = &actExit{}
	if m.once {
		m.exit.err = context.Canceled
	}
	m.exitSent = true
	return append(acts, *m.exit)
}

// wake is when the machine next wants to be told the time: the earliest
// moment something it waits for falls due. Zero when nothing is.
func (m *machine) wake(now time.Time) time.Time {
	var at []time.Time
	if m.plan == nil && !m.booting {
		at = append(at, m.bootAt)
	}
	if m.plan != nil && !m.once {
		if m.polling {
			at = append(at, m.pollStarted.Add(m.stallAfter()))
		} else {
			at = append(at, m.pollAt)
		}
		if !m.registering {
			at = append(at, m.regAt)
		}
		if m.noRun() == "" || m.run != nil {
			at = append(at, m.due)
		}
	}
	if t := m.st.Termination; t != nil && m.run != nil {
		at = append(at, t.Deadline.Add(-endRunReserve))
	}
	if m.stopping {
		at = append(at, m.stopBy)
	}
	var first time.Time
	for _, t := range at {
		if t.After(now) && (first.IsZero() || t.Before(first)) {
			first = t
		}
	}
	return first
}

// stallAfter is how long a poll may take before the agent counts as
// stuck: three poll intervals, and the time its requests may take when
// IMDS does not answer them.
func (m *machine) stallAfter() time.Duration { return 3*m.cfg.IMDS.PollInterval.D() + pollBudget }

// stalled reports whether a poll is stuck (a hung D-Bus call, a wedged
// file system): the agent then stops feeding the systemd watchdog, which
// restarts it.
func (m *machine) stalled(now time.Time) bool {
	return m.polling && now.Sub(m.pollStarted) > m.stallAfter()
}

// reloadable reports whether a reload that was asked for may end the life
// now: no registration is going.
func (m *machine) reloadable() bool { return m.reloading && !m.registering && m.noReload() == "" }

// noReload says why a reload is not taken now, or "": nothing a
// configuration says matters to an instance that is going away, or to an
// agent that is stopping.
func (m *machine) noReload() string {
	switch {
	case m.st.Termination != nil:
		return "the instance is terminating"
	case m.stopping:
		return "the agent is stopping"
	}
	return ""
}

// mayDeregister reports whether the node and client are to be deleted at
// termination: something was registered (or begun), and the configuration
// asks for it.
func (m *machine) mayDeregister() bool {
	return m.plan != nil && !m.once && m.st.NodeName != "" && m.plan.cfg.Chef.Enabled() && m.plan.cfg.Chef.DeregisterOnTermination
}

// phase derives where the agent is from the facts. The order matters: a
// terminated instance's phases come first, so that nothing later (a run
// ending, a stop) can show it idle again.
func (m *machine) phase() Phase {
	d := m.st.Deregistration
	switch {
	case d.Complete():
		return PhaseDeregistered
	case d != nil && !d.InProgress && len(d.LeftBehind) > 0:
		return PhaseFailed
	case m.st.Termination != nil:
		return PhaseTerminating
	case m.failure != nil && m.failure.human:
		return PhaseFailed
	case m.stopping:
		return PhaseStopping
	case m.run != nil:
		return PhaseConverging
	case m.registering:
		return PhaseRegistering
	case m.plan == nil && m.naming.IsZero():
		return PhaseWaitingIMDS
	case m.plan == nil:
		return PhaseApplyingHostname
	case m.notices().Warmed():
		return PhaseWarmPool
	case m.plan.chef != nil && !m.isRegistered():
		return PhaseRegistering
	default:
		return PhaseIdle
	}
}

// statusLine says what the agent is doing, for `systemctl status`.
func (m *machine) statusLine(p Phase) string {
	d, t := m.st.Deregistration, m.st.Termination
	node := m.st.NodeName
	retrying := ""
	if f := m.failure; f != nil {
		retrying = "failed: " + f.err.Error()
		if f.retry > 0 {
			retrying += "; retrying in " + f.retry.Round(time.Second).String()
		}
	}
	switch p {
	case PhaseDeregistered:
		if t == nil {
			return fmt.Sprintf("deregistered: node and client %s deleted (%s)", node, d.Reason)
		}
		return fmt.Sprintf("deregistered: node and client %s deleted; the instance is terminating", node)
	case PhaseFailed:
		if d != nil && len(d.LeftBehind) > 0 {
			what := "deregistration incomplete, left on the Chef server: " + strings.Join(d.LeftBehind, ", ")
			if t != nil {
				return "terminating: " + what
			}
			return what + " (" + d.Reason + ")"
		}
		return retrying
	case PhaseTerminating:
		ch := m.cfg.Chef
		if m.plan != nil {
			ch = m.plan.cfg.Chef
		}
		switch {
		case node == "":
			return "terminating (" + t.Reason + "); nothing registered"
		case !ch.DeregisterOnTermination:
			return "terminating (" + t.Reason + "); node " + node + " kept (deregistration off)"
		case m.run != nil && m.run.final:
			return "terminating (" + t.Reason + "): final chef-client run " + m.run.id
		case m.run != nil:
			return "terminating (" + t.Reason + "): chef-client run " + m.run.id + " ends before node " + node + " is deregistered"
		}
		return fmt.Sprintf("terminating (%s): deregistering node %s by %s", t.Reason, node, t.Deadline.Format(time.RFC3339))
	case PhaseStopping:
		return "stopping"
	case PhaseConverging:
		return "converging: chef-client run " + m.run.id
	case PhaseWarmPool:
		state := m.notices().LifecycleState
		if m.isRegistered() {
			return "warm pool (" + state + "): node " + node + " kept; chef-client runs wait until the instance is back in service"
		}
		return "warm pool (" + state + "): named " + m.plan.name.String() + "; registration waits until the instance goes into service"
	case PhaseIdle:
		return m.idleStatus()
	}
	if retrying != "" {
		return retrying
	}
	switch p {
	case PhaseRegistering:
		return fmt.Sprintf("registering node %s with %s", m.plan.chef.nodeName, m.plan.cfg.Chef.ServerURL)
	case PhaseApplyingHostname:
		return "applying hostname " + m.naming.String()
	default:
		return "waiting for IMDS"
	}
}

func (m *machine) idleStatus() string {
	status := "idle"
	if !m.plan.name.IsZero() {
		status += ", hostname " + m.plan.name.String()
	}
	switch {
	case m.plan.chef == nil:
		status += ", no Chef server configured"
	case !m.plan.cfg.Chef.Exec:
		status += ", chef-client not run (chef.exec: false)"
	case m.st.NextRun != nil:
		status += ", next chef-client run at " + m.st.NextRun.UTC().Format(time.RFC3339)
	}
	if m.st.LastRun != nil {
		status += ", last run " + string(m.st.LastRun.Result)
	}
	return status
}

// view derives the phase, the status line and whether the instance is
// bootstrapped, keeps them in the state for `bootagent status`, and tells
// systemd what changed.
func (m *machine) view() []action {
	p := m.phase()
	status := m.statusLine(p)
	m.st.Phase, m.st.Status, m.st.Bootstrapped = p, status, m.bootstrapped()
	m.st.Error = ""
	switch d := m.st.Deregistration; {
	case d != nil && d.Error != "" && !d.InProgress:
		m.st.Error = d.Error
	case m.failure != nil:
		m.st.Error = m.failure.err.Error()
	}
	if p != m.shownPhase {
		from := m.shownPhase
		if from < 0 {
			from = PhaseStarting
		}
		if m.exit != nil && m.exit.err != nil {
			// The failure ends the agent, and the command line prints it
			// as it exits, unquoted: once is enough.
			m.log.Info("state " + from.String() + " -> " + p.String())
		} else {
			m.log.Info("state "+from.String()+" -> "+p.String(), zap.String("status", status))
		}
		m.metrics.Phase.Reset()
		m.metrics.Phase.WithLabelValues(p.String()).Set(1)
	}
	var acts []action
	switch {
	case !m.once && !m.ready && m.st.Bootstrapped:
		m.ready = true
		m.log.Info("bootstrapped: READY", zap.String("status", status))
		acts = append(acts, actReady{status: status})
	case status != m.shownStatus:
		acts = append(acts, actStatus{status: status})
	}
	m.shownPhase, m.shownStatus = p, status
	return acts
}

// milestone records, as a metric, how long after the agent's start this
// boot reached a step.
func (m *machine) milestone(step string, at time.Time) {
	m.metrics.Timeline.WithLabelValues(step).Set(at.Sub(m.started).Seconds())
}

// setNextRun keeps the time of the next run in the state.
func (m *machine) setNextRun(t time.Time) {
	m.metrics.NextRunTimestamp.Set(float64(t.UnixNano()) / 1e9)
	utc := t.UTC()
	m.st.NextRun = &utc
}

func (m *machine) runLog(id string) *zap.Logger {
	log := m.log.With(zap.String("run_id", id))
	if m.st.NodeName != "" {
		log = log.With(zap.String("node_name", m.st.NodeName))
	}
	return log
}

// sayOnce runs say the first time key is said in this life.
func (m *machine) sayOnce(key string, say func()) {
	if !m.said[key] {
		m.said[key] = true
		say()
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
