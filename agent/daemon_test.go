package agent

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest/observer"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

const terminationPoll = 200 * time.Millisecond

// overridingProxy forwards to a real peer (the IMDS emulator, goiardi) and
// lets a test replace the answer for some paths: the faults the real peers
// cannot produce.
type overridingProxy struct {
	mu        sync.Mutex
	overrides map[string]http.HandlerFunc
	forward   http.HandlerFunc
	// counted, when set, is told of every request.
	counted func(methodPath string)
	URL     string
}

func newOverridingProxy(t testing.TB, target string) *overridingProxy {
	u, err := url.Parse(target)
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(u)
	p := &overridingProxy{overrides: map[string]http.HandlerFunc{}, forward: rp.ServeHTTP}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		h := p.overrides[r.Method+" "+r.URL.Path]
		counted := p.counted
		p.mu.Unlock()
		if counted != nil {
			counted(r.Method + " " + r.URL.Path)
		}
		if h != nil {
			h(w, r)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	p.URL = srv.URL
	return p
}

// set replaces the answer to method+path; nil forwards again.
func (p *overridingProxy) set(methodPath string, h http.HandlerFunc) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if h == nil {
		delete(p.overrides, methodPath)
		return
	}
	p.overrides[methodPath] = h
}

// daemon is an instance whose agent runs as `bootagent run`, with IMDS and
// the Chef server behind proxies that can hold or replace answers. Its
// Auto Scaling lifecycle state is the emulator's scenario, or one the test
// sets (the emulator knows no warm pools, and no states but InService and
// Terminated).
type daemon struct {
	*chefSetup
	imds, chef *overridingProxy
	lifecycle  atomic.Value
	notifier   *recordingNotifier
	mods       []func(*config.Config)
	cfg        *config.Config
	cancel     context.CancelFunc
	done       chan error

	mu       sync.Mutex
	requests map[string]int
}

const daemonUserData = "hostname=web01\nchef_run_list=role[web]\n"

// newDaemon starts an agent whose lifecycle state is the test's: lifecycle
// at first ("" answers 404, as outside an Auto Scaling group).
func newDaemon(t *testing.T, lifecycle string, mod ...func(*config.Config)) *daemon {
	t.Helper()
	d := prepareDaemon(t, nil)
	d.lifecycle.Store(lifecycle)
	d.imds.set("GET /latest/meta-data/autoscaling/target-lifecycle-state", func(w http.ResponseWriter, _ *http.Request) {
		if s := d.lifecycle.Load().(string); s != "" {
			fmt.Fprint(w, s)
			return
		}
		w.WriteHeader(http.StatusNotFound)
	})
	d.launch(t, mod)
	return d
}

// newEmulatedDaemon starts an agent whose IMDS plays one of the
// emulator's own scenarios, such as {"asglifecycle", ...} or {"spot", ...}.
func newEmulatedDaemon(t *testing.T, scenario []string, mod ...func(*config.Config)) *daemon {
	t.Helper()
	d := prepareDaemon(t, scenario)
	d.launch(t, mod)
	return d
}

func prepareDaemon(t *testing.T, scenario []string) *daemon {
	d := &daemon{chefSetup: newChefSetup(t, daemonUserData), requests: map[string]int{}, notifier: &recordingNotifier{}}
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{Command: scenario, UserData: []byte(daemonUserData)})
	d.imds = newOverridingProxy(t, emu.URL)
	d.chef = newOverridingProxy(t, d.goiardi.URL)
	count := func(methodPath string) {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.requests[methodPath]++
	}
	for _, p := range []*overridingProxy{d.imds, d.chef} {
		p.mu.Lock()
		p.counted = count
		p.mu.Unlock()
	}
	return d
}

func (d *daemon) launch(t *testing.T, mod []func(*config.Config)) {
	t.Helper()
	d.mods = append([]func(*config.Config){func(c *config.Config) {
		c.IMDS.Endpoint = d.imds.URL
		c.IMDS.PollInterval = config.Duration(terminationPoll)
		c.Chef.ServerURL = d.chef.URL
		c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin"), "--record", d.record, "--sleep-file", d.record + ".sleep"}
	}}, mod...)
	d.start(t)
	t.Cleanup(func() { d.stop(t) })
}

// start runs the daemon (again, after stop: a restart of the agent).
func (d *daemon) start(t *testing.T) {
	t.Helper()
	mods := append(append([]func(*config.Config){}, d.mods...), func(c *config.Config) { d.cfg = c })
	d.engine, d.logs = newEngineWith(t, testenv.IMDSConfig{}, d.root, func(o *Options) { o.Notifier = d.notifier }, mods...)
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel, d.done = cancel, make(chan error, 1)
	go func() { d.done <- d.engine.Run(ctx) }()
}

func (d *daemon) stop(t *testing.T) {
	t.Helper()
	if d.cancel == nil {
		return
	}
	d.cancel()
	require.NoError(t, <-d.done)
	d.cancel = nil
}

// slowRuns makes the chef-client runs that start from now on take d.
func (d *daemon) slowRuns(t *testing.T, took time.Duration) {
	t.Helper()
	require.NoError(t, writeFileAtomic(d.record+".sleep", took.String()))
}

// count is how many requests for method+path the proxies saw.
func (d *daemon) count(methodPath string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.requests[methodPath]
}

// polls waits until the agent has read its lifecycle state n more times:
// n polls have passed, and whatever they would set off has been set off.
func (d *daemon) polls(t *testing.T, n int) {
	t.Helper()
	const path = "GET /latest/meta-data/autoscaling/target-lifecycle-state"
	seen := d.count(path)
	testenv.Eventually(t, 10*time.Second, func() bool { return d.count(path) >= seen+n }, "%d polls pass", n)
}

func (d *daemon) state(t *testing.T) State {
	t.Helper()
	st, err := ReadState(d.root)
	require.NoError(t, err)
	return st
}

func (d *daemon) registered(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, func() bool { n, c := d.exists(t); return n && c }, "the instance registers")
}

func (d *daemon) exists(t *testing.T) (node, client bool) {
	t.Helper()
	_, err := d.goiardi.Admin.Nodes.Get("web01")
	return err == nil, d.goiardi.Clients(t)["web01"] != ""
}

func (d *daemon) deregistered(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, func() bool { n, c := d.exists(t); return !n && !c }, "node and client deleted")
	testenv.Eventually(t, 10*time.Second, func() bool { return d.state(t).Phase == PhaseDeregistered }, "the deregistration is recorded")
}

func (d *daemon) logged(msg string) int { return d.logs.FilterMessage(msg).Len() }

func (d *daemon) lines(msg string) []observer.LoggedEntry { return d.logs.FilterMessage(msg).All() }

// writeFileAtomic replaces path with content, so that a reader never sees
// it half-written.
func writeFileAtomic(path, content string) error {
	_, err := atomicfile.WriteFile("/", path, []byte(strings.TrimSpace(content)+"\n"), 0o644)
	return err
}
