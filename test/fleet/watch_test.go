package fleet

import (
	"cmp"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/bootagent/bootagent/agent"
	"github.com/bootagent/bootagent/internal/testenv"
)

// watch is the harness's view of a storm's agents: their saved state and
// the last lines each logged.
type watch struct {
	roots []string
	logs  []*tailLog
	// done is when each agent's first chef-client run ended; zero until
	// it has.
	done []time.Time
	left int
}

func newWatch(dir string, n int) *watch {
	w := &watch{roots: make([]string, n), logs: make([]*tailLog, n), done: make([]time.Time, n), left: n}
	for i := range n {
		w.roots[i] = filepath.Join(dir, fmt.Sprintf("agent-%04d", i))
		w.logs[i] = &tailLog{}
	}
	return w
}

// check reads agent i's state and notes whether it converged.
func (w *watch) check(i int) {
	if !w.done[i].IsZero() {
		return
	}
	if st, err := agent.ReadState(w.roots[i]); err == nil && st.FirstRunDone && st.LastRun != nil {
		w.done[i] = st.LastRun.Start.Add(st.LastRun.Duration)
		w.left--
	}
}

// wait returns once every agent has converged, or with an error that
// diagnoses the storm as soon as a peer dies or within has passed. Agents
// say when their state moved on (changed); every -fleet.progress it reads
// them all anyway, and logs how far they got.
func (w *watch) wait(t *testing.T, name string, start time.Time, within time.Duration, changed <-chan int, p peers) error {
	tick := time.NewTicker(*fleetTick)
	defer tick.Stop()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for w.left > 0 {
		var why string
		select {
		case i := <-changed:
			w.check(i)
			continue
		case <-tick.C:
			for i := range w.roots {
				w.check(i)
			}
			t.Logf("%s: %s: %s; %s", name, time.Since(start).Round(time.Second), w.census(), process())
			continue
		case <-p.imds.Exited():
			why = "the IMDS emulator died"
		case <-p.chef.Exited():
			why = "goiardi died"
		case <-deadline.C:
			why = fmt.Sprintf("not converged within %s", within)
		}
		return fmt.Errorf("storm %q stopped after %s: %s\n%s", name, time.Since(start).Round(time.Millisecond), why, w.diagnose(p))
	}
	return nil
}

// census is how far a storm's agents got.
type census struct {
	agents, registered, converged int
	// behind lists the agents not converged, by phase.
	behind map[string][]int
}

func (w *watch) census() census {
	c := census{agents: len(w.roots), behind: map[string][]int{}}
	for i, root := range w.roots {
		st, err := agent.ReadState(root)
		if err == nil && st.RegisteredAt != nil {
			c.registered++
		}
		switch {
		case !w.done[i].IsZero():
			c.converged++
		case err != nil:
			c.behind["unreadable state"] = append(c.behind["unreadable state"], i)
		default:
			c.behind[st.Phase.String()] = append(c.behind[st.Phase.String()], i)
		}
	}
	return c
}

// phases lists the phases of the agents behind, the most crowded first.
func (c census) phases() []string {
	return slices.SortedFunc(maps.Keys(c.behind), func(a, b string) int {
		return cmp.Or(len(c.behind[b])-len(c.behind[a]), strings.Compare(a, b))
	})
}

func (c census) String() string {
	s := fmt.Sprintf("%d/%d registered, %d/%d converged", c.registered, c.agents, c.converged, c.agents)
	var behind []string
	for _, ph := range c.phases() {
		behind = append(behind, fmt.Sprintf("%d %s", len(c.behind[ph]), ph))
	}
	if len(behind) > 0 {
		s += "; not converged: " + strings.Join(behind, ", ")
	}
	return s
}

// diagnosed is how many of the agents behind in each phase a diagnosis
// shows, and how many in all: enough to tell a pattern, short enough to
// read.
const (
	diagnosedPerPhase = 3
	diagnosedAgents   = 12
)

// diagnose says how far the agents got, what those behind were doing and
// last logged, and how the peers and the test process are.
func (w *watch) diagnose(p peers) string {
	c := w.census()
	var b strings.Builder
	fmt.Fprintf(&b, "agents: %s\n", c)
	shown := 0
	for _, ph := range c.phases() {
		for _, i := range c.behind[ph][:min(len(c.behind[ph]), diagnosedPerPhase)] {
			if shown == diagnosedAgents {
				break
			}
			shown++
			st, err := agent.ReadState(w.roots[i])
			fmt.Fprintf(&b, "  %s: %s: %s", filepath.Base(w.roots[i]), ph, st.Status)
			if err != nil {
				fmt.Fprintf(&b, "; state: %v", err)
			}
			if st.Error != "" {
				fmt.Fprintf(&b, "; error: %s", st.Error)
			}
			b.WriteString("\n")
			for _, l := range w.logs[i].last() {
				fmt.Fprintf(&b, "      %s\n", l)
			}
		}
	}
	fmt.Fprintf(&b, "IMDS emulator: %s\n", peerHealth(p.imds.Process, p.imds.URL+"/latest/meta-data/", p.imds.Log))
	fmt.Fprintf(&b, "goiardi: %s\n", peerHealth(p.chef.Process, p.chef.URL+"/", p.chef.Log))
	fmt.Fprintf(&b, "test process: %s", process())
	return b.String()
}

// probeTimeout bounds the request that asks whether a peer answers: a
// peer answers in milliseconds.
const probeTimeout = 5 * time.Second

// peerHealth says whether a peer's process still runs and, if it does,
// whether it answers at url; if it does not, how it ended and its last
// words.
func peerHealth(proc *testenv.Process, url string, log func() string) string {
	if err := proc.Alive(); err != nil {
		return fmt.Sprintf("%v; its log ends: %s", err, lastWords(log()))
	}
	c := http.Client{Timeout: probeTimeout}
	began := time.Now()
	res, err := c.Get(url)
	if err != nil {
		return fmt.Sprintf("running, but does not answer: %v", err)
	}
	res.Body.Close()
	return fmt.Sprintf("running, answers GET %s with %s in %s", url, res.Status, time.Since(began).Round(time.Millisecond))
}

// lastWords finds why a Go program died in what it printed: its fatal
// error or panic, which the goroutine dump that follows would bury; else
// its last lines, cut short (the emulator prints whole requests).
func lastWords(log string) string {
	var lines []string
	for l := range strings.Lines(log) {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "fatal error:") || strings.HasPrefix(l, "panic:") {
			return l
		}
		if l != "" {
			lines = append(lines, l[:min(len(l), 160)])
		}
	}
	return strings.Join(lines[max(0, len(lines)-3):], " | ")
}

// process says how many goroutines and open files the test process has,
// against its limit of open files: 500 agents hold thousands.
func process() string {
	var lim syscall.Rlimit
	fds, err := os.ReadDir("/proc/self/fd")
	if err == nil {
		err = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	if err != nil {
		return fmt.Sprintf("%d goroutines; open files: %v", runtime.NumGoroutine(), err)
	}
	return fmt.Sprintf("%d goroutines, %d open files of %d", runtime.NumGoroutine(), len(fds), lim.Cur)
}

// tailLog keeps the last lines an agent logged, for the diagnosis.
type tailLog struct {
	mu    sync.Mutex
	lines []string
}

// loggedLines is how many of an agent's last log lines a diagnosis shows.
const loggedLines = 4

func (l *tailLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, strings.Split(strings.TrimRight(string(p), "\n"), "\n")...)
	if len(l.lines) > 4*loggedLines {
		l.lines = slices.Clone(l.lines[len(l.lines)-loggedLines:])
	}
	return len(p), nil
}

func (l *tailLog) last() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.lines[max(0, len(l.lines)-loggedLines):])
}

// logger is an agent's logger, at info level, writing to l.
func (l *tailLog) logger() *zap.Logger {
	enc := zap.NewDevelopmentEncoderConfig()
	enc.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
	return zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.AddSync(l), zap.InfoLevel))
}
