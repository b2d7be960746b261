// Package fleet is the scale-out storm: N agents, the real Engine each with
// its own root, configuration and instance ID, register and converge at the
// same instant against one goiardi behind a proxy that throttles like an
// overloaded Chef server. `make test` runs a small fleet and checks what
// must hold; `make bench-fleet` runs 500 and reports.
package fleet

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"

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
)

const userData = "hostname: web\ndomain: fleet.internal\n"

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

// serialiseTokens puts a front before the IMDS emulator that lets one
// token request through at a time: amazon-ec2-metadata-mock v1.13.0 writes
// its token map without a lock (imdsv2.GenerateToken) and dies of
// "concurrent map writes" when hundreds of agents ask at once, which the
// real IMDS, one per instance, never sees.
func serialiseTokens(t *testing.T, target string) string {
	t.Helper()
	u, err := url.Parse(target)
	require.NoError(t, err)
	p := httputil.NewSingleHostReverseProxy(u)
	// The agents' watches are cut off when a storm ends; that is no news.
	p.ErrorLog = log.New(io.Discard, "", 0)
	var mu sync.Mutex
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			mu.Lock()
			defer mu.Unlock()
		}
		p.ServeHTTP(w, r)
	}))
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
	failures                                  []string
}

func runStorm(t *testing.T, imdsURL string, s storm) result {
	t.Helper()
	g := testenv.StartGoiardi(t)
	before := g.Clients(t)
	th := newThrottle(g.URL, g.ValidatorName, *fleetRate, *fleetCode, *fleetLose)
	proxy := httptest.NewServer(th)
	defer proxy.Close()
	standin := testenv.Tool(t, "chefclient-standin")

	n := *fleetSize
	ctx, cancel := context.WithCancel(context.Background())
	changed := make(chan int, n)
	roots := make([]string, n)
	engines := make([]*agent.Engine, n)
	dir := t.TempDir()
	for i := range n {
		roots[i] = filepath.Join(dir, fmt.Sprintf("agent-%04d", i))
		g.PlaceValidator(t, roots[i])
		cfg := config.Default()
		cfg.IMDS.Endpoint = imdsURL
		// Each instance has an IMDS of its own; here one emulator
		// serves the fleet, so the agents poll it less.
		cfg.IMDS.PollInterval = config.Duration(30 * time.Second)
		cfg.Chef.ServerURL = proxy.URL
		cfg.Chef.NodeName = "{hostname}-{instance_id}"
		cfg.Chef.ClientCommand = []string{standin}
		cfg.Chef.Splay = config.Duration(s.splay)
		md := instance{Metadata: imds.New(imds.Options{Endpoint: imdsURL, TokenTTL: cfg.IMDS.TokenTTL.D()}), id: fmt.Sprintf("i-%017x", 0xf1ee7000+i)}
		engines[i] = agent.New(context.Background(), agent.Options{
			Config: cfg, Root: roots[i], Log: zap.NewNop(), Metadata: md, Backoff: s.backoff,
			Notifier: progress{agent: i, changed: changed, end: ctx.Done()},
		})
		defer engines[i].Close()
	}

	var wg sync.WaitGroup
	start := time.Now()
	for _, e := range engines {
		wg.Go(func() { _ = e.Run(ctx) })
	}
	done := make([]time.Time, n)
	deadline := time.After(*fleetTime)
wait:
	for left := n; left > 0; {
		select {
		case i := <-changed:
			if st, err := agent.ReadState(roots[i]); done[i].IsZero() && err == nil && st.FirstRunDone && st.LastRun != nil {
				done[i] = st.LastRun.Start.Add(st.LastRun.Duration)
				left--
			}
		case <-deadline:
			break wait
		}
	}
	r := result{storm: s, agents: n}
	for i, root := range roots {
		if st, err := agent.ReadState(root); done[i].IsZero() && err == nil && len(r.failures) < 10 {
			r.failures = append(r.failures, fmt.Sprintf("%s: %s: %s %s", filepath.Base(root), st.Phase, st.Status, st.Error))
		}
	}
	cancel()
	wg.Wait()
	r.proxy = th.stats()
	var times, registered []time.Duration
	var next []time.Time
	for i, root := range roots {
		st, err := agent.ReadState(root)
		require.NoError(t, err)
		if done[i].IsZero() {
			continue
		}
		r.converged++
		times = append(times, done[i].Sub(start))
		if st.RegisteredAt != nil {
			registered = append(registered, st.RegisteredAt.Sub(start))
		}
		if st.NextRun != nil {
			next = append(next, *st.NextRun)
		}
	}
	r.medianConverged, r.lastConverged = quantiles(times)
	r.medianRegistered, r.lastRegistered = quantiles(registered)
	if len(next) > 1 {
		r.nextRunSpread = slices.MaxFunc(next, time.Time.Compare).Sub(slices.MinFunc(next, time.Time.Compare))
	}
	r.registered, r.duplicates = countClients(t, g, roots, before)
	return r
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
	for _, s := range storms {
		r := runStorm(t, imdsURL, s)
		rows, results = append(rows, r.report()), append(results, r)
		assert.Equal(t, r.agents, r.converged, "%s: every agent converges; the first that did not: %v", s.name, r.failures)
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
	t.Logf("%d agents, proxy at %g requests/s answering %d with Retry-After: %s above it, losing every %d-th client creation's answer\n%s",
		*fleetSize, *fleetRate, *fleetCode, retryAfter, *fleetLose, table(rows))
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
