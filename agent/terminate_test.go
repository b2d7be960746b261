package agent

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

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
			s := newEmulatedDaemon(t, tt.command)
			s.registered(t)
			node, client := s.exists(t)
			require.True(t, node && client)

			s.deregistered(t)
			seen := s.lines("the instance is terminating: no chef-client run starts from now on")
			done := s.lines("deregistered: node and client deleted from the Chef server")
			require.Len(t, seen, 1)
			require.Len(t, done, 1)
			// The notice is seen at most one poll after it appears, and
			// acted on at once.
			assert.Less(t, done[0].Time.Sub(seen[0].Time), terminationPoll, "deleted within a poll of being seen")

			st := s.state(t)
			assert.Equal(t, PhaseDeregistered, st.Phase)
			require.NotNil(t, st.Deregistration)
			assert.Contains(t, st.Deregistration.Reason, tt.reason)
			assert.True(t, st.Deregistration.NodeDeleted && st.Deregistration.ClientDeleted)
			assert.Empty(t, st.Deregistration.LeftBehind)
			require.NotNil(t, st.Notices)
			assert.True(t, st.Notices.Terminating())
			require.NotNil(t, st.Termination)
			assert.Equal(t, st.Deregistration.Reason, st.Termination.Reason)
		})
	}
}

func TestNoticesThatKeepTheInstanceDeleteNothing(t *testing.T) {
	for _, action := range []string{"stop", "hibernate"} {
		t.Run("a spot "+action+" notice", func(t *testing.T) {
			s := newEmulatedDaemon(t, []string{"spot", "-a", action, "-d", "1"})
			s.registered(t)
			testenv.Eventually(t, 20*time.Second, func() bool {
				n := s.state(t).Notices
				return n != nil && n.Spot != nil && n.Spot.Action == action
			}, "the %s notice is seen and kept in the state", action)
			s.polls(t, 3)
			node, client := s.exists(t)
			assert.True(t, node && client, "a stopped instance keeps its node")
			assert.Zero(t, s.logged("the instance is terminating: deregistering from the Chef server"))
			assert.Equal(t, 1, s.logged("spot interruption notice"), "logged once")
			assert.Nil(t, s.state(t).Termination)
		})
	}
	for _, code := range []string{"system-reboot", "instance-stop", "instance-retirement"} {
		t.Run("a scheduled "+code+" event", func(t *testing.T) {
			s := newEmulatedDaemon(t, []string{"events", "--code", code, "-d", "1"})
			s.registered(t)
			testenv.Eventually(t, 20*time.Second, func() bool {
				n := s.state(t).Notices
				return n != nil && len(n.Maintenance) == 1 && n.Maintenance[0].Code == code
			}, "the event is seen and kept in the state")
			s.polls(t, 3)
			node, client := s.exists(t)
			assert.True(t, node && client, "a maintenance event is not a termination")
			assert.Equal(t, 1, s.logged("scheduled maintenance event"), "logged once")
			assert.Zero(t, s.logged("the instance is terminating: deregistering from the Chef server"))
		})
	}
	t.Run("a shutdown or reboot of the agent", func(t *testing.T) {
		s := newEmulatedDaemon(t, nil)
		s.registered(t)
		s.stop(t)
		node, client := s.exists(t)
		assert.True(t, node && client, "stopping the agent deletes nothing")
	})
}

func TestDeregistrationRetriesAChefServerThatIsDownDuringTheNotice(t *testing.T) {
	const textfile = "/var/lib/node_exporter/bootagent.prom"
	s := newDaemon(t, "InService", func(c *config.Config) { c.Metrics.Textfile = textfile })
	s.registered(t)
	var refused atomic.Int32
	down := func(w http.ResponseWriter, _ *http.Request) {
		refused.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	s.chef.set("DELETE /nodes/web01", down)
	s.lifecycle.Store("Terminated")
	testenv.Eventually(t, 20*time.Second, func() bool { return refused.Load() >= 2 }, "the deletion is refused and retried")
	st := s.state(t)
	require.NotNil(t, st.Deregistration)
	assert.True(t, st.Deregistration.InProgress, "the state says a deregistration is going")
	assert.Equal(t, PhaseTerminating, st.Phase)
	// Each refusal is counted, by kind, for the dashboard.
	testenv.Eventually(t, 10*time.Second, func() bool {
		data, err := os.ReadFile(filepath.Join(s.root, textfile))
		p := expfmt.NewTextParser(model.UTF8Validation)
		families, perr := p.TextToMetricFamilies(bytes.NewReader(data))
		return err == nil && perr == nil && sample(t, families, "bootagent_chef_server_errors_total", map[string]string{"kind": "http_5xx"}) >= 2
	}, "the refused deletions are counted as http_5xx")
	s.chef.set("DELETE /nodes/web01", nil)
	s.deregistered(t)
	assert.Positive(t, s.state(t).Deregistration.Retries)
}

func TestDeregistrationGivesUpAtTheDeadlineAndSaysWhatIsLeft(t *testing.T) {
	// A spot notice with only three seconds left, which the emulator cannot
	// give (it always gives two minutes).
	s := newEmulatedDaemon(t, []string{"spot", "-a", "stop", "-d", "86400"})
	s.registered(t)
	s.chef.set("DELETE /nodes/web01", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusBadGateway) })
	s.imds.set("GET /latest/meta-data/spot/instance-action", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `{"action": "terminate", "time": %q}`, time.Now().Add(3*time.Second).UTC().Format(time.RFC3339))
	})
	testenv.Eventually(t, 20*time.Second, func() bool { return s.logged("deregistration incomplete: remove what is left by hand") > 0 }, "the deadline passes")
	testenv.Eventually(t, 10*time.Second, func() bool { return s.state(t).Phase == PhaseFailed }, "recorded")
	st := s.state(t)
	assert.Equal(t, 1, StatusCode(st))
	assert.Equal(t, []string{"node web01", "client web01"}, st.Deregistration.LeftBehind)
	assert.Contains(t, st.Error, "the deadline (")
	assert.Contains(t, st.Error, ") left no time to ask the Chef server again: delete node \"web01\": DELETE "+s.chef.URL+"/nodes/web01: HTTP 502")
	assert.Contains(t, st.Status, "left on the Chef server: node web01, client web01")
	fix := s.lines("deregistration incomplete: remove what is left by hand")[0].ContextMap()["fix"]
	assert.Equal(t, "knife node delete web01 -y; knife client delete web01 -y", fix)
}

func TestAClientThatMayNotDeleteItselfIsExplained(t *testing.T) {
	s := newEmulatedDaemon(t, []string{"asglifecycle", "--asg-termination-delay-sec", "2"})
	s.registered(t)
	s.chef.set("DELETE /clients/web01", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprint(w, `{"error": ["missing delete permission"]}`)
	})
	testenv.Eventually(t, 20*time.Second, func() bool { return s.logged("deregistration incomplete: remove what is left by hand") > 0 }, "the refusal is reported")
	testenv.Eventually(t, 10*time.Second, func() bool { return s.state(t).Phase == PhaseFailed }, "recorded")
	st := s.state(t)
	assert.True(t, st.Deregistration.Refused, "not asked again: a person must act")
	assert.Equal(t, []string{"client web01"}, st.Deregistration.LeftBehind, "the node went; the client stays")
	assert.Contains(t, st.Error, "client \"web01\" may not delete itself")
	assert.Contains(t, st.Error, "knife acl add group clients containers clients delete")
}

func TestAFinalRunComesBeforeDeregistration(t *testing.T) {
	s := newEmulatedDaemon(t, []string{"asglifecycle", "--asg-termination-delay-sec", "2"}, func(c *config.Config) { c.Chef.FinalRun = true })
	s.registered(t)
	s.deregistered(t)
	runs := s.runs(t)
	require.Len(t, runs, 2, "the first run, and the final one")
	final := s.lines("chef-client run finished")
	done := s.lines("deregistered: node and client deleted from the Chef server")
	require.Len(t, final, 2)
	assert.True(t, final[1].Time.Before(done[0].Time), "the final run ends before the node is removed")
}

func TestAWarmPoolInstanceRegistersWhenItGoesIntoService(t *testing.T) {
	s := newDaemon(t, "Warmed:Running")
	n := s.notifier
	testenv.Eventually(t, 10*time.Second, func() bool { r, _, _ := n.snapshot(); return len(r) == 1 }, "READY once named")
	ready, _, _ := n.snapshot()
	assert.Contains(t, ready[0], "warm pool (Warmed:Running)")
	assert.Equal(t, "web01", kernelHostname(t), "named while warm")
	st := s.state(t)
	assert.Equal(t, PhaseWarmPool, st.Phase)
	assert.Equal(t, 0, StatusCode(st))
	assert.Empty(t, s.goiardi.Clients(t)["web01"], "not registered while warm")
	assert.Empty(t, s.runs(t), "no chef-client run while warm")

	s.lifecycle.Store("InService")
	testenv.Eventually(t, 20*time.Second, func() bool { return len(s.runs(t)) == 1 }, "registered and converged once in service")
	assert.NotEmpty(t, s.goiardi.Clients(t)["web01"])
	assert.Equal(t, 1, s.logged("the instance left the warm pool and is in service: registering"))
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
