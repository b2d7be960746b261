package agent

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

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

// terminationSetup is a registered instance whose daemon runs, with IMDS
// and the Chef server reachable through proxies.
type terminationSetup struct {
	*chefSetup
	imds   *overridingProxy
	chef   *overridingProxy
	logs   *observer.ObservedLogs
	cancel context.CancelFunc
	done   chan error
}

func startTermination(t *testing.T, imdsCommand []string, mod ...func(*config.Config)) *terminationSetup {
	t.Helper()
	s := &terminationSetup{chefSetup: newChefSetup(t, "hostname=web01\nchef_run_list=role[web]\n")}
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{Command: imdsCommand, UserData: []byte("hostname=web01\nchef_run_list=role[web]\n")})
	s.imds = newOverridingProxy(t, emu.URL)
	s.chef = newOverridingProxy(t, s.goiardi.URL)
	s.engine, s.logs = newEngine(t, testenv.IMDSConfig{}, s.root, append([]func(*config.Config){func(c *config.Config) {
		c.IMDS.Endpoint = s.imds.URL
		c.IMDS.PollInterval = config.Duration(terminationPoll)
		c.Chef.ServerURL = s.chef.URL
		c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin"), "--record", s.record}
	}}, mod...)...)
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan error, 1)
	go func() { s.done <- s.engine.Run(ctx) }()
	t.Cleanup(func() { s.stop(t) })
	return s
}

func (s *terminationSetup) stop(t *testing.T) {
	if s.cancel == nil {
		return
	}
	s.cancel()
	require.NoError(t, <-s.done)
	s.cancel = nil
}

func (s *terminationSetup) registered(t *testing.T) {
	t.Helper()
	// The client comes before the node: wait for both.
	testenv.Eventually(t, 20*time.Second, func() bool { n, c := s.exists(t); return n && c }, "the instance registers")
}

// exists reports whether the node and the client are on the server.
func (s *terminationSetup) exists(t *testing.T) (node, client bool) {
	_, err := s.goiardi.Admin.Nodes.Get("web01")
	return err == nil, s.goiardi.Clients(t)["web01"] != ""
}

func (s *terminationSetup) logged(msg string) bool { return s.logs.FilterMessage(msg).Len() > 0 }

// waitPolls lets n polls pass, so that whatever a notice would set off has
// had its chance.
func (s *terminationSetup) waitPolls(t *testing.T, n int) {
	seen := s.engine.clock.Now()
	testenv.Eventually(t, 10*time.Second, func() bool { return s.engine.clock.Now().Sub(seen) > time.Duration(n)*terminationPoll }, "%d polls pass", n)
}

func TestATerminationNoticeDeregistersTheNodeAndClient(t *testing.T) {
	tests := []struct {
		name    string
		command []string
		reason  string
	}{
		{"an Auto Scaling termination", []string{"asglifecycle", "--asg-termination-delay-sec", "2"}, "Auto Scaling target lifecycle state Terminated"},
		{"a spot terminate notice", []string{"spot", "-a", "terminate", "-d", "2"}, "spot interruption notice: terminate at"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startTermination(t, tt.command)
			s.registered(t)
			node, client := s.exists(t)
			require.True(t, node && client)

			testenv.Eventually(t, 20*time.Second, func() bool { n, c := s.exists(t); return !n && !c }, "node and client deleted")
			seen := s.logs.FilterMessage("the instance is terminating: deregistering from the Chef server").All()
			done := s.logs.FilterMessage("deregistered: node and client deleted from the Chef server").All()
			require.Len(t, seen, 1)
			require.Len(t, done, 1)
			// The notice is seen at most one poll after it appears, and
			// acted on at once.
			assert.Less(t, done[0].Time.Sub(seen[0].Time), terminationPoll, "deleted within a poll of being seen")

			st := s.engine.snapshot()
			assert.Equal(t, PhaseDeregistered, st.Phase)
			require.NotNil(t, st.Deregistration)
			assert.Contains(t, st.Deregistration.Reason, tt.reason)
			assert.True(t, st.Deregistration.NodeDeleted && st.Deregistration.ClientDeleted)
			assert.Empty(t, st.Deregistration.LeftBehind)
			require.NotNil(t, st.Notices)
			assert.True(t, st.Notices.Terminating())
		})
	}
}

func TestNoticesThatKeepTheInstanceDeleteNothing(t *testing.T) {
	for _, action := range []string{"stop", "hibernate"} {
		t.Run("a spot "+action+" notice", func(t *testing.T) {
			s := startTermination(t, []string{"spot", "-a", action, "-d", "1"})
			s.registered(t)
			testenv.Eventually(t, 20*time.Second, func() bool {
				n := s.engine.snapshot().Notices
				return n != nil && n.Spot != nil && n.Spot.Action == action
			}, "the %s notice is seen and kept in the state", action)
			s.waitPolls(t, 3)
			node, client := s.exists(t)
			assert.True(t, node && client, "a stopped instance keeps its node")
			assert.False(t, s.logged("the instance is terminating: deregistering from the Chef server"))
			assert.True(t, s.logged("spot interruption notice"))
		})
	}
	for _, code := range []string{"system-reboot", "instance-stop", "instance-retirement"} {
		t.Run("a scheduled "+code+" event", func(t *testing.T) {
			s := startTermination(t, []string{"events", "--code", code, "-d", "1"})
			s.registered(t)
			testenv.Eventually(t, 20*time.Second, func() bool {
				n := s.engine.snapshot().Notices
				return n != nil && len(n.Maintenance) == 1 && n.Maintenance[0].Code == code
			}, "the event is seen and kept in the state")
			s.waitPolls(t, 3)
			node, client := s.exists(t)
			assert.True(t, node && client, "a maintenance event is not a termination")
			assert.True(t, s.logged("scheduled maintenance event"))
			assert.False(t, s.logged("the instance is terminating: deregistering from the Chef server"))
		})
	}
	t.Run("a shutdown or reboot of the agent", func(t *testing.T) {
		s := startTermination(t, nil)
		s.registered(t)
		s.stop(t)
		node, client := s.exists(t)
		assert.True(t, node && client, "stopping the agent deletes nothing")
	})
}

func TestDeregistrationRetriesAChefServerThatIsDownDuringTheNotice(t *testing.T) {
	s := startTermination(t, []string{"asglifecycle", "--asg-termination-delay-sec", "2"})
	s.registered(t)
	var refused atomic.Int32
	down := func(w http.ResponseWriter, _ *http.Request) {
		refused.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	s.chef.set("DELETE /nodes/web01", down)
	testenv.Eventually(t, 20*time.Second, func() bool { return refused.Load() >= 2 }, "the deletion is refused and retried")
	s.chef.set("DELETE /nodes/web01", nil)
	testenv.Eventually(t, 20*time.Second, func() bool { n, c := s.exists(t); return !n && !c }, "deleted once the server is back")
	// The state records the deregistration once the deletions are done.
	testenv.Eventually(t, 10*time.Second, func() bool { return s.engine.snapshot().Deregistration != nil }, "the deregistration is recorded")
	assert.Positive(t, s.engine.snapshot().Deregistration.Retries)
}

func TestDeregistrationGivesUpAtTheDeadlineAndSaysWhatIsLeft(t *testing.T) {
	// A spot notice with only three seconds left, which the emulator cannot
	// give (it always gives two minutes).
	s := startTermination(t, []string{"spot", "-a", "stop", "-d", "86400"})
	s.registered(t)
	s.chef.set("DELETE /nodes/web01", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusBadGateway) })
	s.imds.set("GET /latest/meta-data/spot/instance-action", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `{"action": "terminate", "time": %q}`, time.Now().Add(3*time.Second).UTC().Format(time.RFC3339))
	})
	testenv.Eventually(t, 20*time.Second, func() bool { return s.logged("deregistration incomplete: remove what is left by hand") }, "the deadline passes")
	st := s.engine.snapshot()
	assert.Equal(t, PhaseFailed, st.Phase)
	assert.Equal(t, []string{"node web01", "client web01"}, st.Deregistration.LeftBehind)
	assert.Contains(t, st.Error, "the termination deadline passed")
	assert.Contains(t, st.Status, "left on the Chef server: node web01, client web01")
	fix := s.logs.FilterMessage("deregistration incomplete: remove what is left by hand").All()[0].ContextMap()["fix"]
	assert.Equal(t, "knife node delete web01 -y; knife client delete web01 -y", fix)
}

func TestAClientThatMayNotDeleteItselfIsExplained(t *testing.T) {
	s := startTermination(t, []string{"asglifecycle", "--asg-termination-delay-sec", "2"})
	s.registered(t)
	s.chef.set("DELETE /clients/web01", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprint(w, `{"error": ["missing delete permission"]}`)
	})
	testenv.Eventually(t, 20*time.Second, func() bool { return s.logged("deregistration incomplete: remove what is left by hand") }, "the refusal is reported")
	st := s.engine.snapshot()
	assert.Equal(t, []string{"client web01"}, st.Deregistration.LeftBehind, "the node went; the client stays")
	assert.Contains(t, st.Error, "client \"web01\" may not delete itself")
	assert.Contains(t, st.Error, "knife acl add group clients containers clients delete")
}

func TestAFinalRunComesBeforeDeregistration(t *testing.T) {
	s := startTermination(t, []string{"asglifecycle", "--asg-termination-delay-sec", "2"}, func(c *config.Config) { c.Chef.FinalRun = true })
	s.registered(t)
	testenv.Eventually(t, 20*time.Second, func() bool { n, c := s.exists(t); return !n && !c }, "deregistered")
	runs := s.runs(t)
	require.Len(t, runs, 2, "the first run, and the final one")
	final := s.logs.FilterMessage("chef-client run finished").All()
	done := s.logs.FilterMessage("deregistered: node and client deleted from the Chef server").All()
	require.Len(t, final, 2)
	assert.True(t, final[1].Time.Before(done[0].Time), "the final run ends before the node is removed")
}

func TestAWarmPoolInstanceRegistersWhenItGoesIntoService(t *testing.T) {
	var lifecycle atomic.Value
	lifecycle.Store("Warmed:Running")
	s := &terminationSetup{chefSetup: newChefSetup(t, "hostname=web01\n")}
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=web01\n")})
	s.imds = newOverridingProxy(t, emu.URL)
	// The emulator knows no warm pools.
	s.imds.set("GET /latest/meta-data/autoscaling/target-lifecycle-state", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, lifecycle.Load())
	})
	s.engine, s.logs = newEngine(t, testenv.IMDSConfig{}, s.root, func(c *config.Config) {
		c.IMDS.Endpoint = s.imds.URL
		c.IMDS.PollInterval = config.Duration(terminationPoll)
		c.Chef.ServerURL = s.goiardi.URL
		c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin"), "--record", s.record}
	})
	n := &recordingNotifier{}
	s.engine.notifier = n
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.engine.Run(ctx) }()

	testenv.Eventually(t, 10*time.Second, func() bool { r, _, _ := n.snapshot(); return len(r) == 1 }, "READY once named")
	ready, _, _ := n.snapshot()
	assert.Contains(t, ready[0], "warm pool (Warmed:Running)")
	assert.Equal(t, "web01", kernelHostname(t), "named while warm")
	assert.Equal(t, PhaseWarmPool, s.engine.snapshot().Phase)
	assert.Equal(t, 0, StatusCode(s.engine.snapshot()))
	assert.Empty(t, s.goiardi.Clients(t)["web01"], "not registered while warm")
	assert.Empty(t, s.runs(t), "no chef-client run while warm")

	lifecycle.Store("InService")
	testenv.Eventually(t, 20*time.Second, func() bool { return len(s.runs(t)) == 1 }, "registered and converged once in service")
	assert.NotEmpty(t, s.goiardi.Clients(t)["web01"])
	cancel()
	require.NoError(t, <-done)
}

func TestDeregisterByHand(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	cfg := config.Default()
	cfg.Chef.ServerURL = s.goiardi.URL

	d, err := Deregister(context.Background(), s.root, cfg, zaptest.NewLogger(t))
	require.NoError(t, err)
	assert.True(t, d.NodeDeleted && d.ClientDeleted)
	_, nodeErr := s.goiardi.Admin.Nodes.Get("web01")
	assert.Error(t, nodeErr)
	assert.Empty(t, s.goiardi.Clients(t)["web01"])
	st, err := ReadState(s.root)
	require.NoError(t, err)
	require.NotNil(t, st.Deregistration)
	assert.Equal(t, "bootagent deregister", st.Deregistration.Reason)

	_, err = Deregister(context.Background(), s.root, cfg, zaptest.NewLogger(t))
	require.NoError(t, err, "a second deregistration finds both gone, which is fine")

	require.NoError(t, os.Remove(filepath.Join(s.root, "var/lib/bootagent/state.json")))
	_, err = Deregister(context.Background(), s.root, cfg, zaptest.NewLogger(t))
	require.Error(t, err)
	assert.True(t, strings.Contains(err.Error(), "not registered"))
}
