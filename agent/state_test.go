package agent

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/hostname"
	"github.com/bootagent/bootagent/internal/testenv"
)

func TestOnceRecordsTheInstanceInItsState(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\ndomain=example.internal\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)

	st, err := ReadState(s.root)
	require.NoError(t, err)
	assert.Equal(t, "i-0123456789abcdef0", st.InstanceID)
	assert.Equal(t, PhaseIdle, st.Phase)
	assert.True(t, st.Bootstrapped)
	assert.Equal(t, 0, StatusCode(st))
	assert.Equal(t, "web01.example.internal", st.Hostname)
	assert.Equal(t, "web01.example.internal", st.NodeName)
	assert.Equal(t, "web01.example.internal", st.ClientName)
	require.NotNil(t, st.RegisteredAt)
	assert.True(t, st.FirstRunDone)
	require.NotNil(t, st.LastRun)
	assert.Equal(t, "success", string(st.LastRun.Result))
	var steps []string
	for _, step := range st.Boot.Steps {
		steps = append(steps, step.Name)
	}
	assert.Equal(t, []string{"imds", "user-data", "hostname", "register"}, steps)
	fi, err := os.Stat(filepath.Join(s.root, "var/lib/bootagent/state.json"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), fi.Mode().Perm(), "the state holds no secret")
}

func TestANewInstanceFromTheImageRegistersAsItself(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n", func(c *config.Config) { c.Chef.NodeName = "{hostname}-{instance_id}" })
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	oldKey := readFile(t, filepath.Join(s.root, "etc/chef/client.pem"))

	// The image is baked without `bootagent clean` and launched again: same
	// files, another instance ID. The validator is baked back in.
	s.goiardi.PlaceValidator(t, s.root)
	s.engine, _ = newEngine(t, testenv.IMDSConfig{InstanceID: "i-0bbbbbbbbbbbbbbbb", UserData: []byte("hostname=web01\n")}, s.root, func(c *config.Config) {
		c.Chef.ServerURL = s.goiardi.URL
		c.Chef.NodeName = "{hostname}-{instance_id}"
		c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin"), "--record", s.record}
	})
	res, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "web01-i-0bbbbbbbbbbbbbbbb", res.NodeName)
	assert.True(t, res.Registered.ClientCreated, "registered as a new node")
	assert.False(t, res.Registered.KeyReused, "the old instance's key is not reused")
	assert.NotEqual(t, oldKey, readFile(t, filepath.Join(s.root, "etc/chef/client.pem")))
	runs := s.runs(t)
	require.Len(t, runs, 2)
	assert.NotEmpty(t, runs[1]["first_boot"], "a new instance gets its first-boot run")
	st, err := ReadState(s.root)
	require.NoError(t, err)
	assert.Equal(t, "i-0bbbbbbbbbbbbbbbb", st.InstanceID)
	assert.Equal(t, "web01-i-0bbbbbbbbbbbbbbbb", st.NodeName)
}

func TestCleanForgetsTheInstanceButKeepsTheValidator(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n", func(c *config.Config) { c.Chef.DeleteValidationKey = false })
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)

	removed, err := Clean(s.root, config.Default())
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{statePath, "/etc/chef/client.pem", "/etc/chef/first-boot.json", clientRBPath, runEnvPath}, removed)
	_, err = os.Stat(filepath.Join(s.root, "etc/chef/validation.pem"))
	require.NoError(t, err, "the validator stays for the next instance")
	st, err := ReadState(s.root)
	require.NoError(t, err)
	assert.Empty(t, st.InstanceID)
	assert.Equal(t, 2, StatusCode(st))
}

func TestCleanRemovesTheFilesWhereUserDataPutThem(t *testing.T) {
	s := newChefSetup(t, "#cloud-config\nhostname: web01\nchef:\n  firstboot_path: /etc/chef/firstboot.json\n  client_key: /etc/chef/node.pem\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	require.FileExists(t, filepath.Join(s.root, "etc/chef/firstboot.json"))

	// The baked config knows nothing of user-data's paths.
	removed, err := Clean(s.root, config.Default())
	require.NoError(t, err)
	assert.Subset(t, removed, []string{"/etc/chef/firstboot.json", "/etc/chef/node.pem"})
	assert.NoFileExists(t, filepath.Join(s.root, "etc/chef/firstboot.json"), "the previous instance's attributes do not go into the image")
	assert.NoFileExists(t, filepath.Join(s.root, "etc/chef/node.pem"))
}

func TestCleanAndOnceRefuseWhileAnAgentIsRunning(t *testing.T) {
	root := t.TempDir()
	unlock, err := flock(root, agentLockPath)
	require.NoError(t, err)
	defer unlock()

	_, err = Clean(root, config.Default())
	require.ErrorIs(t, err, errAgentRunning)
	assert.Contains(t, err.Error(), "systemctl stop bootagent")
	e := New(context.Background(), Options{Config: config.Default(), Root: root})
	_, err = e.Once(context.Background())
	require.ErrorIs(t, err, errAgentRunning)
}

func TestADamagedStateIsReportedAndStartedAfresh(t *testing.T) {
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, stateDir), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, statePath), []byte(`{"version": 1, "phase": "idle", "instance_id": `), 0o644))
	st, err := ReadState(root)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "is damaged")
	assert.Empty(t, st.InstanceID)
}

// recordingNotifier keeps what the agent told systemd.
type recordingNotifier struct {
	mu       sync.Mutex
	ready    []string
	statuses []string
	stopping bool
}

func (n *recordingNotifier) Ready(s string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.ready = append(n.ready, s)
}

func (n *recordingNotifier) Status(s string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.statuses = append(n.statuses, s)
}

func (n *recordingNotifier) Stopping() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.stopping = true
}

func (n *recordingNotifier) Watchdog() {}

func (n *recordingNotifier) snapshot() ([]string, []string, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.ready...), append([]string(nil), n.statuses...), n.stopping
}

func TestRunIsReadyOnceRegisteredAndSaysWhatItDoes(t *testing.T) {
	s := newDaemon(t, "")
	n := s.notifier

	testenv.Eventually(t, 15*time.Second, func() bool { r, _, _ := n.snapshot(); return len(r) == 1 }, "READY=1 is sent")
	ready, statuses, _ := n.snapshot()
	assert.Regexp(t, "^converging: chef-client run ", ready[0], "READY comes with the first run starting")
	assert.Contains(t, statuses, "waiting for IMDS")
	assert.Contains(t, statuses, "applying hostname web01")
	assert.Contains(t, statuses, "registering node web01 with "+s.chef.URL)
	st, err := ReadState(s.root)
	require.NoError(t, err)
	require.NotNil(t, st.RegisteredAt, "READY comes after registration is recorded")

	testenv.Eventually(t, 15*time.Second, func() bool {
		ready, st, _ := n.snapshot()
		for _, s := range append(ready, st...) {
			if len(s) > 11 && s[:11] == "converging:" {
				return true
			}
		}
		return false
	}, "the first run is announced")
	s.stop(t)
	_, _, stopping := n.snapshot()
	assert.True(t, stopping, "STOPPING=1 on shutdown")
}

func TestRunReloadsItsConfiguration(t *testing.T) {
	root := newRoot(t)
	var cfg *config.Config
	e, logs := newEngine(t, testenv.IMDSConfig{UserData: []byte("hostname=web01\n")}, root, func(c *config.Config) { cfg = c })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	testenv.Eventually(t, 10*time.Second, func() bool { return kernelHostname(t) == "web01" }, "first config applied")

	next := *cfg
	next.Hostname.Domain = "example.internal"
	e.Reload(next)
	testenv.Eventually(t, 10*time.Second, func() bool { return kernelHostname(t) == "web01.example.internal" }, "the reloaded config applies")
	assert.Equal(t, 1, logs.FilterMessage("configuration reloaded; a new life starts with it").Len())
	cancel()
	require.NoError(t, <-done)
}

// countingNotifier counts WATCHDOG=1.
type countingNotifier struct {
	recordingNotifier
	watchdogs atomic.Int32
}

func (n *countingNotifier) Watchdog() { n.watchdogs.Add(1) }

// hangingNamer applies the name at boot and at the first drift check, then
// hangs, as a wedged D-Bus call would.
type hangingNamer struct {
	Namer
	calls atomic.Int32
}

func (h *hangingNamer) Apply(ctx context.Context, n hostname.Name, p hostname.Policy) ([]hostname.Change, error) {
	if h.calls.Add(1) <= 2 {
		return h.Namer.Apply(ctx, n, p)
	}
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestTheWatchdogIsFedOnlyWhilePollsEnd(t *testing.T) {
	root := newRoot(t)
	n := &countingNotifier{}
	namer := &hangingNamer{Namer: hostname.New(context.Background(), root, zaptest.NewLogger(t))}
	e, logs := newEngineWith(t, testenv.IMDSConfig{UserData: []byte("hostname=web01\n")}, root, func(o *Options) {
		o.Notifier, o.Namer, o.Watchdog = n, namer, 100*time.Millisecond
	}, func(c *config.Config) {
		c.IMDS.PollInterval = config.Duration(time.Second)
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()

	testenv.Eventually(t, 10*time.Second, func() bool { return n.watchdogs.Load() >= 3 }, "WATCHDOG=1 every 100ms while the loop turns")
	testenv.Eventually(t, 10*time.Second, func() bool { return namer.calls.Load() >= 3 }, "the second drift check hangs")
	testenv.Eventually(t, 20*time.Second, func() bool {
		return logs.FilterMessage("a poll is stuck (the host name check or IMDS); not feeding the systemd watchdog").Len() == 1
	}, "the stall is noticed")
	fed := n.watchdogs.Load()
	time.Sleep(500 * time.Millisecond) // Five watchdog intervals, to see that none is fed.
	assert.Equal(t, fed, n.watchdogs.Load(), "no WATCHDOG=1 while a poll is stuck: systemd will restart the agent")
	cancel()
	require.NoError(t, <-done)
}
