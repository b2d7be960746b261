package imds

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

func TestNoticesFromTheEmulatorsScenarios(t *testing.T) {
	tests := []struct {
		name        string
		command     []string
		before      func(t *testing.T, n Notices)
		after       func(t *testing.T, n Notices)
		terminating bool
		// all says every notice is awaited, not the first: the reads
		// are one after another, so one read can straddle the moment
		// the emulator's delays end and see only some of them.
		all bool
	}{
		{
			name: "an Auto Scaling termination",
			// The delays run from the emulator's start; three seconds leave
			// room for the first read on a loaded machine.
			command: []string{"asglifecycle", "--asg-termination-delay-sec", "3"},
			before: func(t *testing.T, n Notices) {
				assert.Equal(t, "InService", n.LifecycleState)
				assert.False(t, n.Terminating())
			},
			after: func(t *testing.T, n Notices) {
				assert.Equal(t, "Terminated", n.LifecycleState)
			},
			terminating: true,
		},
		{
			name:    "a spot terminate notice",
			command: []string{"spot", "-a", "terminate", "-d", "3", "--rebalance-delay-sec", "0"},
			before: func(t *testing.T, n Notices) {
				assert.Nil(t, n.Spot)
				assert.NotNil(t, n.Rebalance, "the rebalance recommendation comes first")
			},
			after: func(t *testing.T, n Notices) {
				require.NotNil(t, n.Spot)
				assert.Equal(t, "terminate", n.Spot.Action)
				assert.WithinDuration(t, time.Now().Add(2*time.Minute), n.Spot.Time, 10*time.Second, "two minutes' warning")
			},
			terminating: true,
		},
		{
			name:    "a spot stop notice",
			command: []string{"spot", "-a", "stop", "-d", "1"},
			after: func(t *testing.T, n Notices) {
				require.NotNil(t, n.Spot)
				assert.Equal(t, "stop", n.Spot.Action)
			},
		},
		{
			name:    "a spot hibernate notice",
			command: []string{"spot", "-a", "hibernate", "-d", "1"},
			after: func(t *testing.T, n Notices) {
				require.NotNil(t, n.Spot)
				assert.Equal(t, "hibernate", n.Spot.Action)
			},
		},
		{
			name:    "every mock at once, with scheduled maintenance",
			command: []string{"-d", "1", "--asg-termination-delay-sec", "1"},
			all:     true,
			after: func(t *testing.T, n Notices) {
				require.NotNil(t, n.Spot)
				assert.Equal(t, "Terminated", n.LifecycleState)
				require.NotEmpty(t, n.Maintenance)
				assert.Equal(t, "system-reboot", n.Maintenance[0].Code)
				assert.False(t, n.Maintenance[0].NotBefore.IsZero())
			},
			terminating: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := testenv.StartIMDS(t, testenv.IMDSConfig{Command: tt.command})
			c := newClient(t, m.URL)
			r := c.Notices(context.Background())
			require.Empty(t, r.Failed)
			n := r.Notices
			if tt.before != nil {
				tt.before(t, n)
			}
			testenv.Eventually(t, 10*time.Second, func() bool {
				r = c.Notices(context.Background())
				n = r.Notices
				seen := []bool{n.Spot != nil, n.LifecycleState == "Terminated", len(n.Maintenance) > 0}
				if tt.all {
					return len(r.Failed) == 0 && !slices.Contains(seen, false)
				}
				return len(r.Failed) == 0 && slices.Contains(seen, true)
			}, "the notice appears")
			tt.after(t, n)
			assert.Equal(t, tt.terminating, n.Terminating())
		})
	}
}

func TestNoticesAreQuietByDefaultInTheTests(t *testing.T) {
	m := testenv.StartIMDS(t, testenv.IMDSConfig{})
	r := newClient(t, m.URL).Notices(context.Background())
	assert.Empty(t, r.Failed)
	assert.Equal(t, Notices{LifecycleState: "InService"}, r.Notices)
}

func TestAPathThatFailsKeepsItsLastValueAndHidesNoOther(t *testing.T) {
	m := testenv.StartIMDS(t, testenv.IMDSConfig{})
	u, err := url.Parse(m.URL)
	require.NoError(t, err)
	emulator := httputil.NewSingleHostReverseProxy(u)
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/latest/meta-data/events/maintenance/scheduled":
			w.WriteHeader(http.StatusInternalServerError)
		case "/latest/meta-data/spot/instance-action":
			fmt.Fprint(w, `{"action": "terminate", "time": "2026-11-25T10:38:01Z"}`)
		default:
			emulator.ServeHTTP(w, r)
		}
	}))
	t.Cleanup(front.Close)
	r := newClient(t, front.URL).Notices(context.Background())
	require.Len(t, r.Failed, 1)
	assert.Contains(t, r.Failed["events/maintenance/scheduled"].Error(), "HTTP 500")
	last := Notices{Maintenance: []MaintenanceEvent{{Code: "system-reboot"}}}
	n := r.Over(last)
	assert.Equal(t, "InService", n.LifecycleState)
	require.NotNil(t, n.Spot, "the spot notice is read beside the failing path")
	assert.True(t, n.Terminating())
	assert.Equal(t, last.Maintenance, n.Maintenance, "the failed path keeps what it last said")
}

func TestWhatEachTargetLifecycleStateMeans(t *testing.T) {
	for state, want := range map[string]struct{ warm, terminating bool }{
		"InService":         {},
		"Standby":           {},
		"Detached":          {},
		"":                  {},
		"Warmed:Running":    {warm: true},
		"Warmed:Stopped":    {warm: true},
		"Warmed:Hibernated": {warm: true},
		"Terminated":        {terminating: true},
		"Warmed:Terminated": {terminating: true},
	} {
		n := Notices{LifecycleState: state}
		assert.Equal(t, want.warm, n.Warmed(), "%q in a warm pool", state)
		assert.Equal(t, want.terminating, n.Terminating(), "%q terminating", state)
	}
}

func TestParseNotices(t *testing.T) {
	s, err := ParseSpotAction([]byte(`{"action": "terminate", "time": "2026-11-25T10:38:01Z"}`))
	require.NoError(t, err)
	assert.Equal(t, SpotAction{Action: "terminate", Time: time.Date(2026, 11, 25, 10, 38, 1, 0, time.UTC)}, *s)
	for _, bad := range []string{`{"action": "explode", "time": "2026-11-25T10:38:01Z"}`, `{"action": "stop", "time": "soon"}`, `[]`, `nope`} {
		_, err := ParseSpotAction([]byte(bad))
		assert.Error(t, err, bad)
	}

	state, err := ParseLifecycleState([]byte("Warmed:Pending:Wait\n"))
	require.NoError(t, err)
	assert.Equal(t, "Warmed:Pending:Wait", state)
	assert.True(t, Notices{LifecycleState: state}.Warmed())
	for _, bad := range []string{"", "In Service", "Terminated\x00", string(make([]byte, 100))} {
		_, err := ParseLifecycleState([]byte(bad))
		assert.Error(t, err, "%q", bad)
	}

	events, err := ParseMaintenance([]byte(`[{"Code": "instance-stop", "State": "active", "NotBefore": "25 Nov 2026 09:31:18 GMT"}]`))
	require.NoError(t, err)
	assert.Equal(t, []MaintenanceEvent{{Code: "instance-stop", State: "active", NotBefore: time.Date(2026, 11, 25, 9, 31, 18, 0, time.UTC)}}, events)

	_, err = ParseRebalance([]byte(`{"noticeTime": "yesterday"}`))
	assert.Error(t, err)
}

// FuzzParseNotices feeds arbitrary IMDS answers to every notice parser:
// none may panic, and what they accept is sane.
func FuzzParseNotices(f *testing.F) {
	f.Add([]byte(`{"action": "terminate", "time": "2026-11-25T10:38:01Z"}`))
	f.Add([]byte(`[{"Code": "system-reboot", "State": "active", "NotBefore": "25 Nov 2026 09:31:18 GMT"}]`))
	f.Add([]byte(`{"noticeTime": "2026-11-25T10:36:01Z"}`))
	f.Add([]byte("Terminated"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if s, err := ParseSpotAction(b); err == nil && s.Action != "terminate" && s.Action != "stop" && s.Action != "hibernate" {
			t.Fatalf("accepted spot action %q", s.Action)
		}
		if st, err := ParseLifecycleState(b); err == nil && (st == "" || len(st) > maxStateLen) {
			t.Fatalf("accepted lifecycle state %q", st)
		}
		if ev, err := ParseMaintenance(b); err == nil && len(ev) > maxEvents {
			t.Fatalf("kept %d events", len(ev))
		}
		_, _ = ParseRebalance(b)
	})
}
