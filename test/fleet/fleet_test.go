// Package fleet is the scale-out storm: N agents, the real Engine each with
// its own root, configuration and instance ID, register and converge at the
// same instant against one goiardi behind a proxy that throttles like an
// overloaded Chef server. `make test` runs a small fleet and checks what
// must hold; `make bench-fleet` runs 500 and reports.
package fleet

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/agent"
	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/internal/testenv"
)

var (
	fleetSize = flag.Int("fleet.n", 20, "agents in the storm")
	fleetRate = flag.Float64("fleet.rate", 20, "requests a second the throttling proxy lets through to the Chef server")
	fleetCode = flag.Int("fleet.status", http.StatusServiceUnavailable, "what the proxy answers above the rate: 503 or 429")
	fleetLose = flag.Int("fleet.lose", 5, "the proxy loses the answer to every N-th client creation (0: none)")
	fleetTime = flag.Duration("fleet.timeout", 10*time.Minute, "how long a storm may take to converge")
	fleetTick = flag.Duration("fleet.progress", 10*time.Second, "how often a storm logs how far it got")
	fleetPlot = flag.String("fleet.plot", "", "where to draw the storms as a PNG (gnuplot); empty: a scratch file, checked and thrown away")
)

// userData names every instance web.fleet.internal (the node names differ
// by instance ID).
const userData = "#cloud-config\nhostname: web\nfqdn: web.fleet.internal\n"

// noBackoff is an agent without backoff or jitter: every retry one second
// after the failure (or when Retry-After says), the same for the whole
// fleet.
var noBackoff = backoff.Policy{Initial: time.Second, Max: time.Second}

// instance is the one IMDS emulator seen from one instance of the fleet:
// the emulator serves a single identity, so each agent is given its own
// instance ID on top of the real answers.
type instance struct {
	agent.Metadata
	id string
}

func (m instance) Wait(ctx context.Context, timeout time.Duration) (imds.Identity, imds.WaitStats, error) {
	id, st, err := m.Metadata.Wait(ctx, timeout)
	id.InstanceID = m.id
	return id, st, err
}

// tokenFront stands before the IMDS emulator and lets a token request
// through only alone: amazon-ec2-metadata-mock v1.13.0 writes its token
// map without a lock (imdsv2.GenerateToken) while every other request
// reads it (imdsv2.ValidateToken), and dies of "concurrent map writes" or
// "concurrent map read and map write" when hundreds of agents ask at
// once, which the real IMDS, one per instance, never sees. Reads go on
// side by side: the emulator writes the map on a read only to drop an
// expired token, and the agents' tokens live six hours.
type tokenFront struct {
	mu    sync.RWMutex
	proxy *httputil.ReverseProxy
}

func (f *tokenFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPut {
		f.mu.Lock()
		defer f.mu.Unlock()
	} else {
		f.mu.RLock()
		defer f.mu.RUnlock()
	}
	if r.Context().Err() != nil {
		// The agent gave up while it waited (IMDS answers within half
		// a second or not at all); asking the emulator would only keep
		// the others waiting longer.
		return
	}
	// Once asked, the emulator serves the request to its end even if the
	// agent gives up on it, reading the token map all the while: the lock
	// is held until the emulator answers, not until the agent leaves. (A
	// context that can never end would make the proxy watch the
	// connection instead, and cancel on its close.)
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	f.proxy.ServeHTTP(w, r.WithContext(ctx))
}

func newTokenFront(t *testing.T, target string) *tokenFront {
	t.Helper()
	u, err := url.Parse(target)
	require.NoError(t, err)
	p := httputil.NewSingleHostReverseProxy(u)
	// The agents' watches are cut off when a storm ends; that is no news.
	p.ErrorLog = log.New(io.Discard, "", 0)
	return &tokenFront{proxy: p}
}

// serialiseTokens puts a tokenFront before the emulator at target and
// returns its URL.
func serialiseTokens(t *testing.T, target string) string {
	t.Helper()
	front := httptest.NewServer(newTokenFront(t, target))
	t.Cleanup(front.Close)
	return front.URL
}

// progress tells the harness that an agent's state moved on: the agent
// saves its state before each status it gives systemd.
type progress struct {
	agent   int
	changed chan<- int
	end     <-chan struct{}
}

func (p progress) Status(string) {
	select {
	case p.changed <- p.agent:
	case <-p.end:
	}
}

func (progress) Ready(string) {}
func (progress) Stopping()    {}
func (progress) Watchdog()    {}

// storm is one scale-out.
type storm struct {
	name    string
	backoff *backoff.Policy
	splay   time.Duration
}

// result is what a storm came to.
type result struct {
	storm
	agents, registered, duplicates, converged int
	lastConverged, medianConverged            time.Duration
	lastRegistered, medianRegistered          time.Duration
	nextRunSpread                             time.Duration
	proxy                                     throttleStats
	// timeline is the storm second by second: requests offered and
	// served, instances registered and converged by then.
	timeline [][5]int
}

// peers are the real servers a storm runs against, and where the agents
// reach them: through fronts (the token serialiser, a fault) or not.
type peers struct {
	imds    *testenv.IMDS
	imdsURL string
	chef    *testenv.Goiardi
	chefURL string
}

// stopBound is how long the agents may take to stop once a storm is over:
// each ends its workers within ten seconds (agent.workerEnd), so more
// means one ignores its context.
const stopBound = time.Minute

// runStorm launches the fleet against p and waits, for at most within,
// until every agent has converged. A storm that cannot end (a peer died)
// or does not in time ends early with an error that says how far each
// agent got, what it last logged, and whether each peer still runs and
// answers. While it waits it logs its progress every -fleet.progress.
func runStorm(t *testing.T, p peers, s storm, within time.Duration) (result, error) {
	t.Helper()
	g := p.chef
	before := g.Clients(t)
	th := newThrottle(p.chefURL, g.ValidatorName, *fleetRate, *fleetCode, *fleetLose)
	proxy := httptest.NewServer(th)
	defer proxy.Close()
	standin := testenv.Tool(t, "chefclient-standin")

	n := *fleetSize
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changed := make(chan int, n)
	w := newWatch(t.TempDir(), n)
	engines := make([]*agent.Engine, n)
	for i, root := range w.roots {
		g.PlaceValidator(t, root)
		cfg := config.Default()
		cfg.IMDS.Endpoint = p.imdsURL
		// Each instance has an IMDS of its own; here one emulator
		// serves the fleet, so the agents poll it less.
		cfg.IMDS.PollInterval = config.Duration(30 * time.Second)
		cfg.Chef.ServerURL = proxy.URL
		cfg.Chef.NodeName = "{hostname}-{instance_id}"
		cfg.Chef.ClientCommand = []string{standin}
		cfg.Chef.Splay = config.Duration(s.splay)
		md := instance{Metadata: imds.New(imds.Options{Endpoint: p.imdsURL, TokenTTL: cfg.IMDS.TokenTTL.D()}), id: fmt.Sprintf("i-%017x", 0xf1ee7000+i)}
		engines[i] = agent.New(context.Background(), agent.Options{
			Config: cfg, Root: root, Log: w.logs[i].logger(), Metadata: md, Backoff: s.backoff,
			Notifier: progress{agent: i, changed: changed, end: ctx.Done()},
		})
		defer engines[i].Close()
	}

	var wg sync.WaitGroup
	ended := make([]atomic.Bool, n)
	start := time.Now()
	for i, e := range engines {
		wg.Go(func() {
			_ = e.Run(ctx)
			ended[i].Store(true)
		})
	}
	stormErr := w.wait(t, s.name, start, within, changed, p)
	cancel()
	stopped := make(chan struct{})
	go func() { wg.Wait(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(stopBound):
		var going []string
		for i := range ended {
			if !ended[i].Load() {
				going = append(going, filepath.Base(w.roots[i]))
			}
		}
		// Their requests must not hold the proxy's Close.
		proxy.CloseClientConnections()
		var stacks strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&stacks, 1)
		return result{}, errors.Join(stormErr, fmt.Errorf("%d agents did not stop within %s of the end of the storm: %s\ngoroutines:\n%s",
			len(going), stopBound, strings.Join(going, " "), stacks.String()))
	}
	if stormErr != nil {
		return result{}, stormErr
	}

	r := result{storm: s, agents: n, converged: n, proxy: th.stats()}
	var times, registered []time.Duration
	var next []time.Time
	for i, root := range w.roots {
		st, err := agent.ReadState(root)
		require.NoError(t, err)
		times = append(times, w.done[i].Sub(start))
		if st.RegisteredAt != nil {
			registered = append(registered, st.RegisteredAt.Sub(start))
		}
		if st.NextRun != nil {
			next = append(next, *st.NextRun)
		}
	}
	r.medianConverged, r.lastConverged = quantiles(times)
	r.medianRegistered, r.lastRegistered = quantiles(registered)
	r.timeline = timeline(th, start, registered, times)
	if len(next) > 1 {
		r.nextRunSpread = slices.MaxFunc(next, time.Time.Compare).Sub(slices.MinFunc(next, time.Time.Compare))
	}
	r.registered, r.duplicates = countClients(t, g, w.roots, before)
	return r, nil
}

// timeline is the storm per second from start: what the proxy was offered
// and let through, and how many agents had registered and converged.
func timeline(th *throttle, start time.Time, registered, converged []time.Duration) [][5]int {
	offered, served := th.perSecond(start)
	last := max(len(offered), len(served))
	for _, d := range append(slices.Clone(registered), converged...) {
		last = max(last, int(d/time.Second)+1)
	}
	upTo := func(ds []time.Duration, s int) int {
		n := 0
		for _, d := range ds {
			if d < time.Duration(s+1)*time.Second {
				n++
			}
		}
		return n
	}
	at := func(counts []int, s int) int {
		if s < len(counts) {
			return counts[s]
		}
		return 0
	}
	rows := make([][5]int, last+1)
	for s := range rows {
		rows[s] = [5]int{s, at(offered, s), at(served, s), upTo(registered, s), upTo(converged, s)}
	}
	return rows
}

// plot draws the two storms side by side with gnuplot (storm.gp) into out.
func plot(t *testing.T, out string, shipped, off result) {
	t.Helper()
	dir := t.TempDir()
	files := make([]string, 2)
	for i, r := range []result{shipped, off} {
		var b strings.Builder
		for _, row := range r.timeline {
			fmt.Fprintf(&b, "%d %d %d %d %d\n", row[0], row[1], row[2], row[3], row[4])
		}
		files[i] = filepath.Join(dir, fmt.Sprintf("storm-%d.dat", i))
		require.NoError(t, os.WriteFile(files[i], []byte(b.String()), 0o644))
	}
	script, err := filepath.Abs("storm.gp")
	require.NoError(t, err)
	ymax := 0
	for _, r := range []result{shipped, off} {
		for _, row := range r.timeline {
			ymax = max(ymax, row[1])
		}
	}
	vars := fmt.Sprintf("out=%q; shipped=%q; off=%q; n=%d; rate=%g; xmax=%d; ymax=%d", out, files[0], files[1], *fleetSize, *fleetRate,
		max(len(shipped.timeline), len(off.timeline)), ymax+ymax/10+1)
	cmd := exec.Command(testenv.Tool(t, "gnuplot"), "-e", vars, script)
	msg, err := cmd.CombinedOutput()
	require.NoError(t, err, "gnuplot: %s", msg)
}

// quantiles returns the median and the largest of d.
func quantiles(d []time.Duration) (median, last time.Duration) {
	if len(d) == 0 {
		return 0, 0
	}
	slices.Sort(d)
	return d[len(d)/2], d[len(d)-1]
}

// countClients counts the agents whose client is on the server with the
// key the agent holds, and the clients the storm made beyond one per agent.
func countClients(t *testing.T, g *testenv.Goiardi, roots []string, before map[string]string) (registered, duplicates int) {
	t.Helper()
	after := g.Clients(t)
	for _, root := range roots {
		st, err := agent.ReadState(root)
		require.NoError(t, err)
		if st.ClientName == "" {
			continue
		}
		keyPEM, err := os.ReadFile(filepath.Join(root, "etc/chef/client.pem"))
		require.NoError(t, err)
		key, err := chef.ParseKey(keyPEM)
		require.NoError(t, err)
		block, _ := pem.Decode([]byte(g.ClientPublicKey(t, st.ClientName)))
		require.NotNil(t, block, "the server holds a PEM public key for %s", st.ClientName)
		pub, err := x509.ParsePKIXPublicKey(block.Bytes)
		require.NoError(t, err)
		if key.PublicKey.Equal(pub) {
			registered++
		}
	}
	return registered, len(after) - len(before) - registered
}

func (r result) report() []string {
	return []string{
		r.name,
		fmt.Sprintf("%d/%d", r.registered, r.agents),
		fmt.Sprint(r.duplicates),
		fmt.Sprintf("%d/%d", r.converged, r.agents),
		r.medianRegistered.Round(100*time.Millisecond).String() + " / " + r.lastRegistered.Round(100*time.Millisecond).String(),
		r.medianConverged.Round(100*time.Millisecond).String() + " / " + r.lastConverged.Round(100*time.Millisecond).String(),
		fmt.Sprint(r.proxy.PeakOffered),
		fmt.Sprint(r.proxy.PeakForwarded),
		fmt.Sprintf("%d/%d", r.proxy.Refused, r.proxy.Offered),
		fmt.Sprint(r.proxy.Lost),
		fmt.Sprint(r.proxy.Early),
		r.nextRunSpread.Round(time.Second).String(),
	}
}

// TestScaleOutStorm launches a fleet at once against a throttled Chef
// server, as shipped and with backoff and splay off, and checks that every
// instance registers once, converges, and waits as long as the server asks.
func TestScaleOutStorm(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	require.NoError(t, syscall.Sethostname([]byte("localhost")))
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{InstanceID: "i-0123456789abcdef0", UserData: []byte(userData)})
	imdsURL := serialiseTokens(t, emu.URL)

	storms := []storm{
		{name: "as shipped", splay: 5 * time.Minute},
		{name: "backoff, splay off", backoff: &noBackoff},
	}
	var rows [][]string
	var results []result
	for k, s := range storms {
		g := testenv.StartGoiardi(t)
		r, err := runStorm(t, peers{imds: emu, imdsURL: imdsURL, chef: g, chefURL: g.URL}, s, stormBudget(t, len(storms)-k))
		require.NoError(t, err)
		rows, results = append(rows, r.report()), append(results, r)
		assert.Equal(t, r.agents, r.registered, "%s: every agent's client is on the server with its key", s.name)
		assert.Zero(t, r.duplicates, "%s: no client beyond one per agent", s.name)
		assert.Zero(t, r.proxy.Early, "%s: no agent comes back before Retry-After", s.name)
		assert.LessOrEqual(t, float64(r.proxy.PeakForwarded), *fleetRate+burstFor(*fleetRate), "%s: the server saw no more than the proxy lets through", s.name)
		assert.Positive(t, r.proxy.Refused, "%s: the storm was throttled, or it tested nothing", s.name)
		if *fleetLose > 0 && r.agents >= *fleetLose {
			assert.Positive(t, r.proxy.Lost, "%s: some client creations lost their answer", s.name)
			assert.GreaterOrEqual(t, r.proxy.Conflicts, r.proxy.Lost, "%s: each agent whose answer was lost found its own client on the 409", s.name)
		}
	}
	assert.Greater(t, results[0].nextRunSpread, results[1].nextRunSpread, "the splay spreads the scheduled runs after the first")
	picture := *fleetPlot
	if picture == "" {
		picture = filepath.Join(t.TempDir(), "fleet.png")
	}
	plot(t, picture, results[0], results[1])
	png, err := os.ReadFile(picture)
	require.NoError(t, err)
	assert.True(t, bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")), "gnuplot drew a PNG")
	for _, r := range results {
		last := r.timeline[len(r.timeline)-1]
		assert.Equal(t, [2]int{r.agents, r.agents}, [2]int{last[3], last[4]}, "%s: the picture ends with every agent registered and converged", r.name)
		offered, served := 0, 0
		for _, row := range r.timeline {
			offered, served = offered+row[1], served+row[2]
		}
		assert.Equal(t, [2]int{r.proxy.Offered, r.proxy.Forwarded}, [2]int{offered, served}, "%s: the picture counts every request", r.name)
	}
	t.Logf("%d agents, proxy at %g requests/s answering %d with Retry-After: %s above it, losing every %d-th client creation's answer\n%s",
		*fleetSize, *fleetRate, *fleetCode, retryAfter, *fleetLose, table(rows))
}

// reportTime is what a storm leaves of the test binary's -timeout to stop
// its agents, count the clients and report: past it the binary panics
// with goroutine dumps and says nothing of the fleet.
const reportTime = 2 * time.Minute

// stormBudget is how long the next storm may take: -fleet.timeout, or its
// share of what the test binary's -timeout leaves, less reportTime for
// each storm left.
func stormBudget(t *testing.T, left int) time.Duration {
	end, ok := t.Deadline()
	if !ok {
		return *fleetTime
	}
	budget := min(*fleetTime, time.Until(end)/time.Duration(left)-reportTime)
	if budget <= 0 {
		t.Fatalf("-timeout leaves no time for %d more storms and their reports (%s each); give go test a longer -timeout", left, reportTime)
	}
	return budget
}

func table(rows [][]string) string {
	head := []string{"storm", "registered", "duplicates", "converged", "registered p50 / last", "converged p50 / last", "peak offered/s", "peak served/s", "refused", "lost answers", "early retries", "next runs spread"}
	all := append([][]string{head}, rows...)
	width := make([]int, len(head))
	for _, r := range all {
		for i, c := range r {
			width[i] = max(width[i], len(c))
		}
	}
	var b strings.Builder
	for _, r := range all {
		for i, c := range r {
			fmt.Fprintf(&b, "| %-*s ", width[i], c)
		}
		b.WriteString("|\n")
	}
	return b.String()
}
