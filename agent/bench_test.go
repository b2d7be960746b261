package agent

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

// benchPoll is the poll interval of the termination benchmark: short, so
// that iterations are quick; the latency it measures is bounded by it.
const benchPoll = time.Second

// BenchmarkNoticeToDeregistered measures the time from a termination notice
// appearing in IMDS (the emulator's own Terminated, unmasked at a known
// instant by a proxy) to the node and client gone from goiardi, with the
// daemon polling every second. Target: under one poll interval plus 100 ms.
func BenchmarkNoticeToDeregistered(b *testing.B) {
	var took []time.Duration
	for b.Loop() {
		b.StopTimer()
		s, flip := startMaskedTermination(b)
		// The notice comes at any moment of the poll cycle.
		time.Sleep(rand.N(benchPoll))
		b.StartTimer()
		start := time.Now()
		flip()
		testenv.Eventually(b, 30*time.Second, func() bool {
			_, nodeErr := s.goiardi.Admin.Nodes.Get("web01")
			clients, err := s.goiardi.Admin.Clients.List()
			return nodeErr != nil && err == nil && clients["web01"] == ""
		}, "node and client deleted")
		took = append(took, time.Since(start))
		b.StopTimer()
		s.cancel()
		if err := <-s.done; err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2])/float64(time.Millisecond), "ms-notice-to-deleted-p50")
	b.ReportMetric(float64(took[len(took)-1])/float64(time.Millisecond), "ms-notice-to-deleted-max")
	b.ReportMetric(float64(benchPoll)/float64(time.Millisecond), "ms-poll-interval")
}

// startMaskedTermination runs a registered daemon whose IMDS is the
// emulator's Auto Scaling scenario, already Terminated, with the lifecycle
// path answered InService until flip is called.
func startMaskedTermination(b *testing.B) (*maskedTermination, func()) {
	s := &maskedTermination{chefSetup: newChefSetup(b, "hostname=web01\n")}
	emu := testenv.StartIMDS(b, testenv.IMDSConfig{Command: []string{"asglifecycle", "--asg-termination-delay-sec", "0"}, UserData: []byte("hostname=web01\n")})
	s.imds = newOverridingProxy(b, emu.URL)
	var masked atomic.Bool
	masked.Store(true)
	s.imds.set("GET /latest/meta-data/autoscaling/target-lifecycle-state", func(w http.ResponseWriter, r *http.Request) {
		if masked.Load() {
			fmt.Fprint(w, "InService")
			return
		}
		s.imds.forward(w, r)
	})
	s.engine = New(context.Background(), Options{Config: benchConfig(s), Root: s.root})
	b.Cleanup(s.engine.Close)
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan error, 1)
	go func() { s.done <- s.engine.Run(ctx) }()
	testenv.Eventually(b, 20*time.Second, func() bool { st, err := ReadState(s.root); return err == nil && st.Phase == PhaseIdle }, "registered and idle")
	return s, func() { masked.Store(false) }
}

// maskedTermination is a daemon whose termination a benchmark unmasks.
type maskedTermination struct {
	*chefSetup
	imds   *overridingProxy
	cancel context.CancelFunc
	done   chan error
}

func benchConfig(s *maskedTermination) config.Config {
	cfg := config.Default()
	cfg.IMDS.Endpoint = s.imds.URL
	cfg.IMDS.PollInterval = config.Duration(benchPoll)
	cfg.Chef.ServerURL = s.goiardi.URL
	cfg.Chef.ClientCommand = []string{"true"}
	return cfg
}

// BenchmarkIdleIMDSRequests counts the requests an idle daemon makes to
// IMDS: per poll, one GET of each watched path, and no token request while
// the token lives. It reports the most requests any one path got per poll,
// and the token requests after the first.
func BenchmarkIdleIMDSRequests(b *testing.B) {
	testenv.RequirePrivateUTS(b)
	emu := testenv.StartIMDS(b, testenv.IMDSConfig{UserData: []byte("hostname=idle01\n")})
	var mu sync.Mutex
	counts := map[string]int{}
	// counting is on only during the idle periods measured.
	counting := false
	p := newOverridingProxy(b, emu.URL)
	p.mu.Lock()
	p.counted = func(key string) {
		mu.Lock()
		if counting {
			counts[key]++
		}
		mu.Unlock()
	}
	p.mu.Unlock()
	proxy := p.URL
	const poll = 100 * time.Millisecond
	for b.Loop() {
		b.StopTimer()
		cfg := config.Default()
		cfg.IMDS.Endpoint = proxy
		cfg.IMDS.PollInterval = config.Duration(poll)
		root := newRoot(b)
		e := New(context.Background(), Options{Config: cfg, Root: root})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- e.Run(ctx) }()
		testenv.Eventually(b, 10*time.Second, func() bool { st, err := ReadState(root); return err == nil && st.Phase == PhaseIdle }, "idle")
		mu.Lock()
		counting = true
		mu.Unlock()
		b.StartTimer()
		time.Sleep(3 * time.Second) // The idle period being measured.
		b.StopTimer()
		mu.Lock()
		counting = false
		mu.Unlock()
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		e.Close()
		b.StartTimer()
	}
	mu.Lock()
	defer mu.Unlock()
	polls := float64(3*time.Second) / float64(poll)
	most, paths := 0, 0
	for key, n := range counts {
		if key != "PUT /latest/api/token" {
			most = max(most, n)
			paths++
		}
	}
	b.ReportMetric(float64(most)/polls/float64(b.N), "req-per-path-per-poll")
	b.ReportMetric(float64(counts["PUT /latest/api/token"])/float64(b.N), "token-puts-while-idle")
	b.ReportMetric(float64(paths), "paths-watched")
}
