package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/metrics"
)

// sim plays the machine against scripted peers, on a clock it moves
// itself: an IMDS whose notices it sets, a Chef server that holds clients
// and nodes by name (or is down), chef-client runs that end when it says,
// in a transient unit that outlives the agent or as a child process that
// does not. Each worker the machine starts is held until the simulation
// completes it. Nothing sleeps and nothing runs concurrently, so any
// interleaving of events can be played, and replayed.
type sim struct {
	t    testing.TB
	now  time.Time
	cfg  config.Config
	plan *plan
	m    *machine
	// disk is the state as last saved: what a restart reads.
	disk    []byte
	checked []byte
	metrics *metrics.Metrics
	trace   []string
	runs    int
	// observe, when set, is told of every change of phase.
	observe func(from, to Phase)

	// The world.
	clients, nodes       map[string]bool
	key                  bool
	serverDown           bool
	lifecycle            string
	spot                 *imds.SpotAction
	failPath             string
	terminationAnnounced bool
	firstRunSucceeded    bool
	endedRuns            map[string]bool
	completedOnDisk      bool
	// unit is true when chef-client runs in transient units, which outlive
	// the agent; orphan is a run whose unit goes on unfollowed.
	unit   bool
	orphan *actRun

	// Work in flight in this process.
	booting, registering, polling bool
	regStopped                    bool
	run                           *actRun
	runEnding                     bool
	endCause                      error
	dereg                         *actDeregister
	deregNodeDone, formerDone     bool
	formerLeft                    []string
	exited                        bool
	ready                         int
	reloading                     bool
}

const simInstance = "i-0123456789abcdef0"

var (
	machineSeed = flag.Uint64("machine.seed", 0, "replay the one interleaving of TestRandomInterleavings with this seed")
	machineRuns = flag.Int("machine.runs", 2000, "how many interleavings TestRandomInterleavings plays")
)

func simConfig() config.Config {
	cfg := config.Default()
	cfg.IMDS.PollInterval = config.Duration(5 * time.Second)
	cfg.Hostname.Name = "web01"
	cfg.Chef.ServerURL = "https://chef.example.com/organizations/acme"
	cfg.Chef.Interval, cfg.Chef.Splay = config.Duration(30*time.Minute), config.Duration(5*time.Minute)
	return cfg
}

func newSim(t testing.TB, cfg config.Config) *sim {
	t.Helper()
	s := &sim{t: t, now: time.Date(2026, 11, 25, 8, 0, 0, 0, time.UTC), lifecycle: "InService",
		clients: map[string]bool{}, nodes: map[string]bool{}, endedRuns: map[string]bool{}, metrics: metrics.New()}
	s.configure(cfg)
	s.newLife(State{Version: stateVersion}, nil)
	return s
}

// configure makes cfg the configuration the next life starts with.
func (s *sim) configure(cfg config.Config) {
	p, err := decide(cfg, config.UserData{Format: "none"}, gathered{identity: imds.Identity{InstanceID: simInstance, Region: "eu-west-1"}}, "/")
	require.NoError(s.t, err)
	s.cfg, s.plan = cfg, p
}

// noJitter makes every retry policy exact, so that a seed replays.
func noJitter(p backoff.Policy) backoff.Policy { p.Jitter = 0; return p }

// newLife makes a machine from st, as a start or a reload does, and starts
// it, with run going on from before when it is not nil.
func (s *sim) newLife(st State, run *runInfo) {
	s.m = newMachine(machineOptions{
		log: zap.NewNop(), metrics: s.metrics, cfg: s.cfg, started: s.now, clock: backoff.RealClock{},
		newRunID: func(time.Time) string { s.runs++; return fmt.Sprintf("run-%d", s.runs) },
		retry:    noJitter,
	}, st)
	s.exited, s.ready, s.reloading = false, 0, false
	s.booting, s.registering, s.polling, s.regStopped, s.dereg = false, false, false, false, nil
	s.step("start", evStart{run: run})
}

// step gives the machine ev, saves the state as the driver does (before
// the actions), takes note of the work it starts, and checks every
// invariant.
func (s *sim) step(what string, ev event) []action {
	s.t.Helper()
	s.trace = append(s.trace, what)
	before := s.m.shownPhase
	acts := s.m.step(s.now, ev)
	if s.observe != nil && before != s.m.shownPhase {
		s.observe(max(before, PhaseStarting), s.m.shownPhase)
	}
	s.save()
	for _, a := range acts {
		switch a := a.(type) {
		case actBoot:
			s.booting = true
		case actRegister:
			s.registering, s.regStopped = true, false
			// The key is the registration's first write.
			s.key = true
		case actStopRegister:
			s.regStopped = true
		case actRun:
			if s.m.st.Termination != nil && !a.run.final {
				s.fail("chef-client run %s starts after the termination was noticed", a.run.id)
			}
			if s.run != nil || s.orphan != nil {
				s.fail("chef-client run %s starts beside another", a.run.id)
			}
			s.run, s.runEnding = &a, false
		case actEndRun:
			s.runEnding, s.endCause = true, a.cause
		case actPoll:
			s.polling = true
		case actDeregister:
			if s.completedOnDisk {
				s.fail("a completed deregistration starts again")
			}
			if s.orphan != nil || s.run != nil {
				s.fail("the deregistration starts while chef-client runs, which may save the node again")
			}
			s.dereg, s.deregNodeDone, s.formerDone, s.formerLeft = &a, a.current == nil || a.current.NodeGone, false, nil
		case actReady:
			s.ready++
			if s.ready > 1 {
				s.fail("READY twice in one life")
			}
		case actExit:
			s.exited = true
		}
	}
	s.check()
	s.reloaded()
	return acts
}

func (s *sim) fail(format string, args ...any) {
	s.t.Helper()
	s.t.Fatalf("%s\nafter: %s", fmt.Sprintf(format, args...), strings.Join(s.trace, " | "))
}

// save keeps the state as the driver's store would (JSON, read back at a
// restart).
func (s *sim) save() {
	data, err := json.Marshal(s.m.st)
	require.NoError(s.t, err)
	s.disk = data
}

func (s *sim) onDisk() State {
	var st State
	require.NoError(s.t, json.Unmarshal(s.disk, &st))
	return st
}

// held reports whether the server holds anything under name.
func (s *sim) held(name string) bool { return s.clients[name] || s.nodes[name] }

// check holds the invariants: the phase of a terminating instance is
// never an ordinary one again, and the state on disk never claims more
// than happened, nor knows less than the server holds.
func (s *sim) check() {
	s.t.Helper()
	if s.m.st.Termination != nil {
		switch p := s.m.phase(); p {
		case PhaseTerminating, PhaseDeregistered, PhaseFailed:
		default:
			s.fail("phase %s after the termination was noticed", p)
		}
	}
	if bytes.Equal(s.disk, s.checked) {
		return
	}
	s.checked = s.disk
	st := s.onDisk()
	if st.Termination != nil && !s.terminationAnnounced {
		s.fail("a termination recorded that IMDS never announced")
	}
	for name := range s.clients {
		if s.held(name) && name != st.NodeName && !slices.Contains(st.FormerNodes, name) {
			s.fail("the server holds %s, which the state does not know", name)
		}
	}
	for name := range s.nodes {
		if s.held(name) && name != st.NodeName && !slices.Contains(st.FormerNodes, name) {
			s.fail("the server holds node %s, which the state does not know", name)
		}
	}
	d := st.Deregistration
	if d.Complete() {
		s.completedOnDisk = true
		for name := range s.clients {
			if s.held(name) {
				s.fail("deregistered on disk, but the server holds %s", name)
			}
		}
	}
	if d != nil && d.NodeDeleted && s.nodes[st.NodeName] {
		s.fail("the node is deleted on disk, but on the server")
	}
	if st.RegisteredAt != nil && d == nil && (!s.clients[st.NodeName] || !s.nodes[st.NodeName]) {
		s.fail("registered on disk, but the server holds client %t node %t", s.clients[st.NodeName], s.nodes[st.NodeName])
	}
	if st.FirstRunDone && !s.firstRunSucceeded {
		s.fail("the first run is done on disk, but none succeeded")
	}
	if st.LastRun != nil && !s.endedRuns[st.LastRun.ID] {
		s.fail("the last run %s on disk never ended", st.LastRun.ID)
	}
}

// booted completes the bootstrap, as the worker does: it tells of the
// identity, of the name it applies, and then that it is done.
func (s *sim) booted() {
	s.booting = false
	s.step("identified", evIdentified{identity: imds.Identity{InstanceID: simInstance}})
	s.step("naming", evNaming{name: s.plan.name})
	s.step("booted", evBooted{b: booted{
		identity: imds.Identity{InstanceID: simInstance}, plan: s.plan, started: s.now,
		lifecycle: s.lifecycle, keyPresent: s.key,
	}})
}

// How a simulated registration ends (with the server up; with it down,
// every one fails before the first write).
const (
	regDone       = iota // the client and the node are made
	regClientOnly        // the client is made, then it stops or fails
	regNameTaken         // another instance owns the name: a person must act
)

// registered completes the registration as how says.
func (s *sim) registered(how int) {
	s.registering = false
	name := s.m.st.NodeName
	switch {
	case s.serverDown:
		s.step("registration failed", evRegisterFailed{err: errors.New("POST /clients: HTTP 503")})
	case how == regDone:
		// Stopped or not: the request going when it was asked to stop
		// may have been the last.
		s.clients[name], s.nodes[name] = true, true
		s.step("registered", evRegistered{reg: chef.Registered{ClientCreated: true, NodeCreated: true}})
	case how == regNameTaken && !s.clients[name]:
		s.step("registration refused", evRegisterFailed{err: fmt.Errorf("register client: %w", chef.ErrNameTaken)})
	default:
		s.clients[name] = true
		s.step("registration failed after the client", evRegisterFailed{err: fmt.Errorf("save node: %w", chef.ErrStopped)})
	}
}

// ran ends the run going with result. A run the agent stopped following
// (it stops, and the run is a unit) goes on, unfollowed.
func (s *sim) ran(result chef.Result) {
	r := s.run
	s.run = nil
	if s.runEnding && s.unit && !errors.Is(s.endCause, chef.ErrEndRun) {
		s.orphan = r
		s.step("run left to its unit", evRunEnded{err: context.Canceled})
		return
	}
	if s.runEnding {
		result = chef.ResultInterrupted
	}
	s.endedRuns[r.run.id] = true
	if r.run.first && !result.Failed() {
		s.firstRunSucceeded = true
	}
	s.step("run "+string(result), evRunEnded{out: chef.Outcome{ID: r.run.id, Start: r.run.started, Result: result}})
}

// runFailedToStart ends the run going before it ran: chef-client missing,
// the unit refused.
func (s *sim) runFailedToStart() {
	s.run = nil
	s.step("run failed to start", evRunEnded{err: errors.New("start chef-client: no such file or directory")})
}

func (s *sim) reading() imds.Reading {
	var r imds.Reading
	r.Notices.LifecycleState = s.lifecycle
	r.Notices.Spot = s.spot
	if s.failPath != "" {
		r.Failed = map[string]error{s.failPath: errors.New("HTTP 500")}
		switch s.failPath {
		case "autoscaling/target-lifecycle-state":
			r.Notices.LifecycleState = ""
		case "spot/instance-action":
			r.Notices.Spot = nil
		}
	}
	return r
}

func (s *sim) polled() {
	s.polling = false
	s.step("polled", evPolled{notices: s.reading()})
}

// deregStep makes the next deletions of the deregistration going: the
// former nodes, then the current node, then its client. With the server
// down it gives up, as it does at the deadline.
func (s *sim) deregStep() {
	a := s.dereg
	ended := func(what string, d chef.Deregistered, err error) {
		s.dereg = nil
		s.step(what, evDeregistered{d: d, err: err, formerLeft: s.formerLeft})
	}
	if !s.formerDone {
		s.formerDone = true
		for _, name := range a.former {
			if s.serverDown {
				s.formerLeft = append(s.formerLeft, name)
				continue
			}
			s.clients[name], s.nodes[name] = false, false
		}
		if len(a.former) > 0 {
			s.trace = append(s.trace, fmt.Sprintf("former nodes %v deleted, %v left", a.former, s.formerLeft))
			return
		}
	}
	l := a.current
	switch {
	case l == nil:
		ended("former nodes deregistered", chef.Deregistered{NodeDeleted: true, ClientDeleted: true}, nil)
	case s.serverDown:
		ended("deregistration gave up", chef.Deregistered{NodeDeleted: s.deregNodeDone}, errors.New("DELETE: HTTP 503"))
	case !l.Confirmed && !s.clients[l.Name]:
		// The server never had the key: nothing of the node is there.
		s.nodes[l.Name] = false
		ended("nothing to deregister", chef.Deregistered{NodeDeleted: true, ClientDeleted: true, NothingThere: true}, nil)
	case !s.deregNodeDone:
		s.nodes[l.Name], s.deregNodeDone = false, true
		s.step("node deleted", evNodeDeleted{})
	default:
		s.clients[l.Name] = false
		ended("deregistered", chef.Deregistered{NodeDeleted: true, ClientDeleted: true}, nil)
	}
}

func (s *sim) advance(d time.Duration) {
	s.now = s.now.Add(d)
	s.step("+"+d.String(), evTick{})
}

// abandon drops the work in flight, as the end of a process or a life
// does; what the workers got to do on the server stays done.
func (s *sim) abandon(pick func(int) int) {
	name := s.m.st.NodeName
	if s.registering && !s.serverDown && pick(2) == 0 {
		s.clients[name] = true
		if pick(2) == 0 {
			s.nodes[name] = true
		}
	}
	// The client goes only after the node's deletion is saved.
	if a := s.dereg; a != nil && !s.serverDown && pick(2) == 0 {
		switch {
		case !s.formerDone && len(a.former) > 0:
			s.clients[a.former[0]], s.nodes[a.former[0]] = false, false
		case a.current == nil:
		case s.deregNodeDone:
			s.clients[a.current.Name] = false
		default:
			s.nodes[a.current.Name] = false
		}
	}
}

// restart is the agent's process ending and starting again: the state
// from disk, and a chef-client run going on only when its unit survived
// (the transient unit runner) and is followed again.
func (s *sim) restart(pick func(int) int) {
	s.abandon(pick)
	var follow *runInfo
	switch {
	case s.orphan != nil:
		s.run, s.orphan = s.orphan, nil
		follow = &runInfo{id: s.run.run.id, started: s.run.run.started}
	case s.run != nil && s.unit:
		follow = &runInfo{id: s.run.run.id, started: s.run.run.started}
	case s.run != nil:
		s.endedRuns[s.run.run.id] = true
		s.run = nil
	}
	s.runEnding = false
	s.newLife(s.onDisk(), follow)
}

// reload is a new life in the same process: the in-memory state, and the
// run going carried into it, once a registration going has answered. The
// daemon ignores a reload while the instance is terminating or the agent
// stopping.
func (s *sim) reload() {
	if s.m.noReload() != "" {
		return
	}
	s.reloading = true
	s.step("reload asked", evReload{})
}

// reloaded starts the new life a reload waits for, once it may.
func (s *sim) reloaded() {
	if !s.reloading || !s.m.reloadable() {
		return
	}
	s.reloading = false
	s.trace = append(s.trace, "reloaded")
	var carried *runInfo
	if s.run != nil {
		r := s.run.run
		carried = &r
	}
	s.newLife(s.m.st, carried)
}

// interleave plays one random interleaving of events, choosing with pick,
// then lets everything settle with the server answering, stops the agent
// (a terminated instance shuts down) and checks that nothing of a
// terminated instance is left on the server.
func interleave(t testing.TB, pick func(int) int, steps int, observe func(from, to Phase)) {
	cfg := simConfig()
	cfg.Chef.FinalRun = pick(4) == 0
	s := newSim(t, cfg)
	s.unit = pick(2) == 0
	s.observe = observe
	lifecycles := []string{"InService", "Standby", "Detached", "Warmed:Running", "Warmed:Stopped", "Warmed:Hibernated", "Terminated", "Warmed:Terminated", ""}
	paths := []string{"autoscaling/target-lifecycle-state", "spot/instance-action", "events/maintenance/scheduled", ""}
	for range steps {
		if s.exited {
			s.trace = append(s.trace, "restart")
			s.restart(pick)
			continue
		}
		type choice struct {
			ok bool
			do func()
		}
		choices := []choice{
			{s.booting, func() {
				if pick(5) == 0 {
					s.booting = false
					s.step("boot failed", evBootFailed{err: errors.New("IMDS: no answer")})
					return
				}
				s.booted()
			}},
			{s.registering, func() { s.registered([]int{regDone, regDone, regClientOnly, regNameTaken}[pick(4)]) }},
			{s.run != nil, func() {
				results := []chef.Result{chef.ResultSuccess, chef.ResultFailed, chef.ResultRebootNeeded}
				s.ran(results[pick(len(results))])
			}},
			{s.run != nil && !s.runEnding && pick(6) == 0, s.runFailedToStart},
			{s.orphan != nil, func() {
				// The unit's run ends unfollowed.
				s.endedRuns[s.orphan.run.id] = true
				s.orphan = nil
				s.trace = append(s.trace, "unfollowed run ended")
			}},
			{s.polling, s.polled},
			{s.dereg != nil, s.deregStep},
			{!s.terminated(), func() {
				s.lifecycle = lifecycles[pick(len(lifecycles))]
				s.trace = append(s.trace, "lifecycle "+s.lifecycle)
				s.announce()
			}},
			{s.spot == nil, func() {
				s.spot = &imds.SpotAction{Action: "terminate", Time: s.now.Add(time.Duration(pick(9)-4) * time.Minute)}
				if pick(3) == 0 {
					s.spot.Action = "stop"
				}
				s.trace = append(s.trace, fmt.Sprintf("spot %s at %s", s.spot.Action, s.spot.Time.Sub(s.now)))
				s.announce()
			}},
			{true, func() {
				s.serverDown = !s.serverDown
				s.trace = append(s.trace, fmt.Sprintf("server down %t", s.serverDown))
			}},
			{true, func() {
				s.failPath = paths[pick(len(paths))]
				s.trace = append(s.trace, "failing "+s.failPath)
			}},
			{true, func() {
				s.advance([]time.Duration{time.Second, 10 * time.Second, 45 * time.Second, 3 * time.Minute, 40 * time.Minute}[pick(5)])
			}},
			{true, func() { s.step("trigger", evTrigger{}) }},
			{true, s.reload},
			{pick(6) == 0, func() {
				// A new node name (chef.node_name, or the name it is made
				// of), taken by a reload.
				next := s.cfg
				next.Chef.NodeName = fmt.Sprintf("web-%d", pick(3))
				s.configure(next)
				s.trace = append(s.trace, "reload as "+next.Chef.NodeName)
				s.reload()
			}},
			{pick(4) == 0, func() { s.trace = append(s.trace, "restart"); s.restart(pick) }},
			{pick(8) == 0, func() { s.step("stop", evStop{}) }},
		}
		var enabled []choice
		for _, c := range choices {
			if c.ok {
				enabled = append(enabled, c)
			}
		}
		enabled[pick(len(enabled))].do()
	}
	s.settle()
}

// terminated reports whether the world announced a termination; it is
// final.
func (s *sim) terminated() bool {
	return (imds.Notices{LifecycleState: s.lifecycle, Spot: s.spot}).Terminating()
}

func (s *sim) announce() {
	if s.terminated() {
		s.terminationAnnounced = true
	}
}

// anything reports whether the server holds anything of the instance.
func (s *sim) anything() bool {
	for name := range s.clients {
		if s.held(name) {
			return true
		}
	}
	for name := range s.nodes {
		if s.held(name) {
			return true
		}
	}
	return false
}

// settle lets the work in flight end with the server answering and
// IMDS's notices read, then stops the agent, and checks what is left.
func (s *sim) settle() {
	s.serverDown, s.failPath = false, ""
	for range 300 {
		switch {
		case s.exited:
			if s.terminated() && s.anything() && s.cfg.Chef.DeregisterOnTermination {
				// The instance is terminating and the agent has stopped: an
				// agent that starts again (a reboot before the end) picks up
				// what is left.
				s.restart(func(int) int { return 0 })
				continue
			}
			s.checkLeft()
			return
		case s.orphan != nil:
			s.endedRuns[s.orphan.run.id] = true
			s.orphan = nil
		case s.booting:
			s.booted()
		case s.registering:
			s.registered(regDone)
		case s.run != nil:
			s.ran(chef.ResultSuccess)
		case s.dereg != nil:
			s.deregStep()
		case s.polling:
			s.polled()
		default:
			s.advance(3 * time.Minute)
			if s.dereg == nil && s.run == nil && !s.registering && !s.booting {
				s.step("stop", evStop{})
			}
		}
	}
	s.fail("the agent did not settle")
}

// checkLeft checks that a terminated instance left nothing on a server
// that answers, when it was to deregister.
func (s *sim) checkLeft() {
	if !s.terminationAnnounced || !s.cfg.Chef.DeregisterOnTermination {
		return
	}
	if s.anything() {
		s.fail("terminated, but the server holds clients %v nodes %v", s.clients, s.nodes)
	}
}

// TestRandomInterleavings plays thousands of interleavings of lifecycle
// changes, spot notices, registration and run completions, server
// failures, reloads, restarts and stops, checking the invariants after
// every step. A failure names its seed: -machine.seed=N replays it.
// It also checks that the picture of the phases (docs/phases.dot, and
// phases.svg rendered from it) draws every change of phase it sees.
func TestRandomInterleavings(t *testing.T) {
	if *machineSeed != 0 {
		playSeed(t, *machineSeed, nil)
		return
	}
	seen := map[[2]Phase]bool{}
	observe := func(from, to Phase) { seen[[2]Phase{from, to}] = true }
	for i := range *machineRuns {
		seed := uint64(i + 1)
		t.Run(fmt.Sprintf("seed %d", seed), func(t *testing.T) { playSeed(t, seed, observe) })
		if t.Failed() {
			return
		}
	}
	drawn := phaseEdges(t, "../docs/phases.dot", `(?m)^\s*(\w+) -> (\w+)`)
	for e := range seen {
		assert.True(t, drawn[e], "docs/phases.dot does not draw %s -> %s, which the machine does", e[0], e[1])
	}
	assert.Equal(t, drawn, phaseEdges(t, "../docs/phases.svg", `<title>(\w+)&#45;&gt;(\w+)</title>`), "docs/phases.svg is not phases.dot rendered: make docs")
}

// phaseEdges reads the edges between phases that pattern finds in file,
// which must name no phase the machine does not have.
func phaseEdges(t *testing.T, file, pattern string) map[[2]Phase]bool {
	data, err := os.ReadFile(file)
	require.NoError(t, err)
	edges := map[[2]Phase]bool{}
	for _, m := range regexp.MustCompile(pattern).FindAllStringSubmatch(string(data), -1) {
		var from, to Phase
		require.NoError(t, from.UnmarshalText([]byte(m[1])), "%s", file)
		require.NoError(t, to.UnmarshalText([]byte(m[2])), "%s", file)
		edges[[2]Phase{from, to}] = true
	}
	require.NotEmpty(t, edges, "%s draws no edge", file)
	return edges
}

func playSeed(t *testing.T, seed uint64, observe func(from, to Phase)) {
	r := rand.New(rand.NewPCG(seed, 0x600d))
	t.Logf("replay with: go test ./agent -run TestRandomInterleavings -machine.seed=%d", seed)
	interleave(t, func(n int) int { return r.IntN(n) }, 150, observe)
}

// FuzzInterleavings lets the fuzzer choose the interleavings (`make
// fuzz`): each byte of the input picks the next event.
func FuzzInterleavings(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add([]byte("warm pool, then in service, then terminated"))
	f.Fuzz(func(t *testing.T, choices []byte) {
		i := 0
		pick := func(n int) int {
			if i >= len(choices) {
				return 0
			}
			i++
			return int(choices[i-1]) % n
		}
		interleave(t, pick, len(choices), nil)
	})
}

// started boots a sim whose instance registers, and returns it with the
// first run going.
func started(t *testing.T) *sim {
	s := newSim(t, simConfig())
	s.booted()
	require.True(t, s.registering, "a registration starts")
	s.registered(regDone)
	require.NotNil(t, s.run, "the first run starts at once, not an interval later")
	return s
}

func (s *sim) period() time.Duration { return 30*time.Minute + splayFor(simInstance, 5*time.Minute) }

func TestScheduleRunsAtOnceThenEveryIntervalPlusSplay(t *testing.T) {
	s := started(t)
	first := s.run
	assert.True(t, first.run.first, "the first run gets the first-boot JSON")
	assert.Equal(t, time.Hour, first.timeout, "chef.run_timeout")
	start := s.now
	s.advance(time.Minute)
	s.ran(chef.ResultSuccess)
	assert.Equal(t, start.Add(s.period()), *s.m.st.NextRun, "the next run is an interval plus the splay after the start of this one")

	s.advance(s.period() - time.Minute - time.Second)
	assert.Nil(t, s.run)
	s.advance(time.Second)
	require.NotNil(t, s.run)
	assert.False(t, s.run.run.first, "later runs do without the first-boot JSON")
}

func TestScheduleSkipsARunWhileThePreviousIsGoing(t *testing.T) {
	s := started(t)
	first := s.run.run.id
	s.advance(s.period())
	assert.Equal(t, first, s.run.run.id, "no second run beside the first")
	s.step("trigger", evTrigger{})
	assert.Equal(t, first, s.run.run.id, "not on SIGUSR1 either")
	s.ran(chef.ResultSuccess)
	assert.Nil(t, s.run, "the skipped run is not made up for")
}

func TestScheduleRetriesAFailedRunSoonerWithBackoff(t *testing.T) {
	s := started(t)
	var delays []time.Duration
	for range 7 {
		s.ran(chef.ResultFailed)
		d := s.m.st.NextRun.Sub(s.now)
		delays = append(delays, d)
		s.advance(d)
		require.NotNil(t, s.run, "retried after %s", d)
		assert.True(t, s.run.run.first, "until a first run succeeds, retries keep the first-boot JSON")
	}
	assert.Equal(t, time.Minute, delays[0], "delays: %v", delays)
	for _, d := range delays {
		assert.LessOrEqual(t, d, 30*time.Minute, "capped at the interval: %v", delays)
	}
	assert.Greater(t, delays[5], delays[0], "the delays grow: %v", delays)
}

func TestScheduleTreatsRebootRequestsAsSuccess(t *testing.T) {
	s := started(t)
	start := s.now
	s.ran(chef.ResultOf(37))
	assert.Equal(t, start.Add(s.period()), *s.m.st.NextRun, "a converge that needs a reboot is not retried")
	assert.True(t, s.m.st.FirstRunDone)
}

func TestTriggerRunStartsARunNow(t *testing.T) {
	s := started(t)
	s.ran(chef.ResultSuccess)
	s.advance(time.Minute)
	s.step("trigger", evTrigger{})
	require.NotNil(t, s.run, "SIGUSR1 starts a run at once")
	assert.False(t, s.run.run.first)
}

func TestARestartKeepsTheSchedule(t *testing.T) {
	s := started(t)
	s.ran(chef.ResultSuccess)
	next := *s.m.st.NextRun
	s.advance(10 * time.Minute)
	s.restart(func(int) int { return 0 })
	s.booted()
	assert.Nil(t, s.run, "a restart does not make a run")
	assert.Equal(t, next, *s.m.st.NextRun, "the next run stays where it was")
	s.advance(next.Sub(s.now) - time.Second)
	assert.Nil(t, s.run)
	s.advance(time.Second)
	assert.NotNil(t, s.run, "and comes when it was due")
}

func TestATerminationWhileRegisteringStopsTheRegistrationAndRemovesWhatItMade(t *testing.T) {
	s := newSim(t, simConfig())
	s.booted()
	require.True(t, s.registering)
	s.lifecycle = "Terminated"
	s.announce()
	s.polled()
	assert.True(t, s.regStopped, "the registration is stopped")
	s.registered(regClientOnly)
	require.NotNil(t, s.dereg, "what the registration may have made is removed")
	assert.False(t, s.dereg.current.Confirmed)
	s.deregStep()
	s.deregStep()
	assert.False(t, s.anything())
	assert.Equal(t, PhaseDeregistered, s.m.phase())
	assert.Nil(t, s.run, "no run on an instance that is going away")
}

func TestARunGoingAtTerminationFinishesWhileTheDeletesKeepTheirTime(t *testing.T) {
	cfg := simConfig()
	cfg.Chef.FinalRun = true
	s := newSim(t, cfg)
	s.booted()
	s.registered(regDone)
	first := s.run.run.id
	s.lifecycle = "Terminated"
	s.announce()
	s.polled()
	assert.False(t, s.runEnding, "two minutes left: the run may finish")
	s.advance(30 * time.Second)
	s.ran(chef.ResultSuccess)
	require.NotNil(t, s.run, "then the final run")
	assert.NotEqual(t, first, s.run.run.id)
	assert.True(t, s.run.run.final)
	assert.Equal(t, 30*time.Second, s.run.timeout, "within what the notice leaves: 2m - 30s gone - 30s for its SIGTERM grace - 30s for the deletes")
	s.ran(chef.ResultSuccess)
	require.NotNil(t, s.dereg, "then the deletes")
}

func TestARunThatWouldEatTheDeletesTimeIsEnded(t *testing.T) {
	s := started(t)
	s.lifecycle = "Terminated"
	s.announce()
	s.polled()
	s.advance(59 * time.Second)
	assert.False(t, s.runEnding, "a minute and a second left: the run may finish")
	s.advance(time.Second)
	assert.True(t, s.runEnding, "ended with 30s for its SIGTERM grace and 30s for the deletes")
	s.ran(chef.ResultSuccess)
	require.NotNil(t, s.dereg)
}

func TestASpotNoticeInThePastStillGetsItsAttempt(t *testing.T) {
	s := started(t)
	s.ran(chef.ResultSuccess)
	s.spot = &imds.SpotAction{Action: "terminate", Time: s.now.Add(-time.Minute)}
	s.announce()
	s.polled()
	require.NotNil(t, s.dereg, "a deregistration starts however late")
	assert.True(t, s.dereg.deadline.Before(s.now))
}

func TestEveryAutoScalingStateHasItsMeaningInTheMachine(t *testing.T) {
	for state, want := range map[string]struct{ runs, deregisters bool }{
		"InService": {runs: true}, "Standby": {runs: true}, "Detached": {runs: true}, "": {runs: true},
		"Warmed:Running": {}, "Warmed:Stopped": {}, "Warmed:Hibernated": {},
		"Terminated": {deregisters: true}, "Warmed:Terminated": {deregisters: true},
	} {
		t.Run(fmt.Sprintf("%q", state), func(t *testing.T) {
			s := started(t)
			s.ran(chef.ResultSuccess)
			s.lifecycle = state
			s.announce()
			s.polled()
			s.step("trigger", evTrigger{})
			assert.Equal(t, want.runs, s.run != nil, "a run on request")
			assert.Equal(t, want.deregisters, s.dereg != nil, "a deregistration")
		})
	}
}

func TestSplayIsFixedPerInstanceAndSpreadsAFleet(t *testing.T) {
	assert.Equal(t, splayFor(simInstance, 5*time.Minute), splayFor(simInstance, 5*time.Minute), "a restart does not reshuffle")
	seen := map[time.Duration]bool{}
	for i := range 1000 {
		d := splayFor(fmt.Sprintf("i-%017x", i), 5*time.Minute)
		require.GreaterOrEqual(t, d, time.Duration(0))
		require.Less(t, d, 5*time.Minute)
		seen[d] = true
	}
	assert.Greater(t, len(seen), 250, "1000 instances spread over 300 possible seconds: %d distinct", len(seen))
	assert.Zero(t, splayFor(simInstance, 0))
}

// terminatedWithAFinalRun is a registered instance with chef.final_run,
// converged, whose Auto Scaling termination was just noticed.
func terminatedWithAFinalRun(t *testing.T) *sim {
	cfg := simConfig()
	cfg.Chef.FinalRun = true
	s := newSim(t, cfg)
	s.booted()
	s.registered(regDone)
	s.ran(chef.ResultSuccess)
	s.lifecycle = "Terminated"
	s.announce()
	s.polled()
	return s
}

func TestAFinalRunThatCannotStartIsNotTriedAgain(t *testing.T) {
	s := terminatedWithAFinalRun(t)
	require.NotNil(t, s.run, "the final run")
	require.True(t, s.run.run.final)
	s.runFailedToStart()
	assert.Nil(t, s.run, "not started again")
	require.NotNil(t, s.dereg, "the deletes come next, with the notice's time")
	assert.Nil(t, s.m.st.Run, "no run is going")
}

func TestAStopAsksIMDSBeforeItEndsTheRun(t *testing.T) {
	s := started(t)
	s.unit = true
	s.polled()
	// The Auto Scaling termination comes just before the shutdown, after
	// the last poll.
	s.lifecycle = "Terminated"
	s.announce()
	s.step("stop", evStop{})
	assert.False(t, s.runEnding, "the run's end waits for IMDS")
	require.True(t, s.polling, "the stop's own poll")
	s.polled()
	require.True(t, s.runEnding)
	assert.ErrorIs(t, s.endCause, chef.ErrEndRun, "the run's unit is stopped, not left going")
	assert.Nil(t, s.dereg, "the deletes wait for the run to end")
	s.ran(chef.ResultSuccess)
	require.NotNil(t, s.dereg)
	s.deregStep()
	s.deregStep()
	assert.False(t, s.anything())
	assert.True(t, s.exited)
}

func TestARunLeftToItsUnitIsNotRacedByTheDeletes(t *testing.T) {
	s := started(t)
	s.unit = true
	s.polled()
	s.step("stop", evStop{})
	s.polled()
	require.True(t, s.runEnding)
	s.ran(chef.ResultSuccess)
	require.NotNil(t, s.orphan, "the unit goes on, unfollowed")
	// The bootstrap's lifecycle read says Terminated after the stop's
	// poll: too late to end the unit this life.
	s.lifecycle = "Terminated"
	s.announce()
	s.noticed()
	assert.Nil(t, s.dereg, "no deletes while chef-client may save the node")
	assert.True(t, s.exited)
}

// noticed hands the machine what IMDS says now, as the bootstrap's own
// read of the lifecycle state does.
func (s *sim) noticed() {
	n := s.m.notices()
	n.LifecycleState = s.lifecycle
	s.m.noticed(s.now, n)
	s.step("lifecycle read", evTick{})
}

func TestARenamedNodeIsRemovedAtTerminationToo(t *testing.T) {
	s := started(t)
	s.ran(chef.ResultSuccess)
	next := s.cfg
	next.Chef.NodeName = "web02"
	s.configure(next)
	s.reload()
	s.booted()
	require.True(t, s.registering, "the new name is registered")
	assert.Equal(t, []string{"web01"}, s.m.st.FormerNodes, "the old one is remembered")
	s.registered(regDone)
	assert.True(t, s.clients["web01"] && s.clients["web02"])
	assert.Nil(t, s.run, "the schedule goes on: no run for the new name")
	s.lifecycle = "Terminated"
	s.announce()
	s.polled()
	require.NotNil(t, s.dereg)
	assert.Equal(t, []string{"web01"}, s.dereg.former)
	for s.dereg != nil {
		s.deregStep()
	}
	assert.False(t, s.anything(), "neither name is left")
	assert.Empty(t, s.m.st.FormerNodes)
	assert.Equal(t, PhaseDeregistered, s.m.phase())
}

func TestARefusedDeregistrationByHandDoesNotStopTheTerminations(t *testing.T) {
	s := started(t)
	s.ran(chef.ResultSuccess)
	// `bootagent deregister` with no agent running: the node went, the
	// server refused the client (403).
	st := s.onDisk()
	s.nodes["web01"] = false
	st.Deregistration = &Deregistration{Reason: "bootagent deregister", Deregistered: chef.Deregistered{NodeDeleted: true},
		LeftBehind: []string{"client web01"}, Refused: true, Error: "delete client: the Chef server refused the deletion"}
	s.m.st = st
	s.save()
	s.restart(func(int) int { return 1 })
	s.booted()
	assert.Equal(t, PhaseFailed, s.m.phase())
	assert.Equal(t, "deregistration incomplete, left on the Chef server: client web01 (bootagent deregister)", s.m.st.Status)
	s.advance(time.Hour)
	s.step("trigger", evTrigger{})
	assert.Nil(t, s.run, "no chef-client run remakes the node")
	s.lifecycle = "Terminated"
	s.announce()
	s.polled()
	require.NotNil(t, s.dereg, "the termination tries again")
	for s.dereg != nil {
		s.deregStep()
	}
	assert.False(t, s.anything())
}

func TestAReloadWhileStoppingIsIgnored(t *testing.T) {
	s := started(t)
	s.step("stop", evStop{})
	assert.Equal(t, "the agent is stopping", s.m.noReload())
}

func TestAFinalRunIsEndedWhenTheDeadlineComesCloser(t *testing.T) {
	s := terminatedWithAFinalRun(t)
	require.True(t, s.run != nil && s.run.run.final, "the final run, with two minutes' notice")
	s.spot = &imds.SpotAction{Action: "terminate", Time: s.now.Add(70 * time.Second)}
	s.polled()
	assert.False(t, s.runEnding)
	s.advance(10 * time.Second)
	assert.True(t, s.runEnding, "ended a minute before the spot notice's time")
	s.ran(chef.ResultSuccess)
	require.NotNil(t, s.dereg, "then the deletes, with their time")
}

// The runs' record says since when they fail, for the alert that waits
// two periods: from the first failure after a success, or ever, and
// nothing once a run (a reboot request included) does not fail.
func TestTheStateKnowsSinceWhenTheRunsFail(t *testing.T) {
	s := started(t)
	first := s.now
	s.ran(chef.ResultFailed)
	require.NotNil(t, s.m.st.FailingSince)
	assert.Equal(t, first, *s.m.st.FailingSince, "failing since the first run, which never succeeded")
	assert.Equal(t, float64(first.Unix()), gauge(t, s.metrics.FailingSince))
	s.advance(s.m.st.NextRun.Sub(s.now))
	s.ran(chef.ResultFailed)
	assert.Equal(t, first, *s.m.st.FailingSince, "a second failure does not move it")
	s.advance(s.m.st.NextRun.Sub(s.now))
	success := s.now
	s.ran(chef.ResultOf(35))
	assert.Nil(t, s.m.st.FailingSince)
	assert.Zero(t, gauge(t, s.metrics.FailingSince))
	assert.Equal(t, success, *s.m.st.LastSuccess)
}

// A state written before the agent recorded its last success takes the
// last run, when it did not fail, as that.
func TestAnOlderStateGetsItsLastSuccessFromItsLastRun(t *testing.T) {
	start := time.Date(2026, 12, 2, 6, 0, 0, 0, time.UTC)
	m := newMachine(machineOptions{log: zap.NewNop(), metrics: metrics.New(), clock: backoff.RealClock{}, retry: noJitter}, State{
		Version: stateVersion, InstanceID: "i-0123456789abcdef0",
		LastRun: &chef.Outcome{Start: start, Result: chef.ResultSuccess},
	})
	require.NotNil(t, m.st.LastSuccess)
	assert.Equal(t, start, *m.st.LastSuccess)
	assert.Equal(t, float64(start.Unix()), gauge(t, m.metrics.LastSuccessTimestamp))
}
