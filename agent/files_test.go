package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

func TestOnceWorksOnAnEmptyRoot(t *testing.T) {
	root := t.TempDir()
	e, _ := newEngine(t, testenv.IMDSConfig{InstanceID: "i-0aaaabbbbccccdddd", UserData: []byte("hostname=web01\ndomain=example.internal\n")}, root)

	_, err := e.Once(context.Background())
	require.NoError(t, err)
	hosts := readFile(t, filepath.Join(root, "etc/hosts"))
	assert.Contains(t, hosts, "127.0.0.1\tlocalhost\n")
	assert.Contains(t, hosts, "\n127.0.1.1\tweb01.example.internal web01\n")
	assert.Contains(t, hosts, "\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	assert.Equal(t, "web01.example.internal\n", readFile(t, filepath.Join(root, "etc/hostname")))
	st, err := ReadState(root)
	require.NoError(t, err)
	assert.Equal(t, "i-0aaaabbbbccccdddd", st.InstanceID)
}

func TestOnceRegistersOnARootWithOnlyTheValidator(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n")
	require.NoError(t, os.RemoveAll(filepath.Join(s.root, "etc/hosts")))
	require.NoError(t, os.RemoveAll(filepath.Join(s.root, "etc/hostname")))

	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.Contains(t, readFile(t, filepath.Join(s.root, "etc/hosts")), "127.0.0.1\tlocalhost\n")
	for _, p := range []string{"etc/chef/client.pem", "etc/chef/client.rb", "etc/chef/first-boot.json", "var/lib/bootagent/state.json"} {
		assert.FileExists(t, filepath.Join(s.root, p))
	}
}

func TestTheAgentLockNeverLeavesTheRoot(t *testing.T) {
	root := t.TempDir()
	outside := filepath.Join(t.TempDir(), "agent.lock")
	lock := filepath.Join(root, agentLockPath)
	require.NoError(t, os.MkdirAll(filepath.Dir(lock), 0o755))
	require.NoError(t, os.Symlink(outside, lock))

	unlock, err := lockAgent(root)
	require.NoError(t, err)
	unlock()
	assert.NoFileExists(t, outside, "nothing is created outside the root")
	assert.FileExists(t, filepath.Join(root, outside), "the absolute link is taken inside the root")
	got, err := os.Readlink(lock)
	require.NoError(t, err)
	assert.Equal(t, outside, got, "the link stays")
}

func TestCleanRemovesALinkedFileInsideTheRootOnly(t *testing.T) {
	root := t.TempDir()
	// The same absolute name outside the root and inside it.
	outside := filepath.Join(t.TempDir(), "client.pem")
	require.NoError(t, os.WriteFile(outside, []byte("not the agent's"), 0o600))
	inside := filepath.Join(root, outside)
	require.NoError(t, os.MkdirAll(filepath.Dir(inside), 0o755))
	require.NoError(t, os.WriteFile(inside, []byte("the node's key"), 0o600))
	key := filepath.Join(root, "etc/chef/client.pem")
	require.NoError(t, os.MkdirAll(filepath.Dir(key), 0o755))
	require.NoError(t, os.Symlink(outside, key))

	removed, err := Clean(root, config.Default())
	require.NoError(t, err)
	assert.Equal(t, []string{"/etc/chef/client.pem"}, removed)
	assert.NoFileExists(t, inside, "the key the link names inside the root is gone")
	assert.FileExists(t, outside, "the file of the same name outside the root is untouched")
}

func TestTheMetricsTextfileNeverLeavesTheRoot(t *testing.T) {
	root := newRoot(t)
	outside := filepath.Join(t.TempDir(), "bootagent.prom")
	link := filepath.Join(root, "var/lib/node_exporter/bootagent.prom")
	require.NoError(t, os.MkdirAll(filepath.Dir(link), 0o755))
	require.NoError(t, os.Symlink(outside, link))
	e, _ := newEngine(t, testenv.IMDSConfig{UserData: []byte("hostname=web01\n")}, root, func(c *config.Config) {
		c.Metrics.Textfile = "/var/lib/node_exporter/bootagent.prom"
	})

	_, err := e.Once(context.Background())
	require.NoError(t, err)
	assert.NoFileExists(t, outside, "nothing is written outside the root")
	assert.Contains(t, readFile(t, filepath.Join(root, outside)), `bootagent_bootstrap_seconds{step="hostname"}`, "the absolute link is taken inside the root")
	got, err := os.Readlink(link)
	require.NoError(t, err)
	assert.Equal(t, outside, got, "the link stays")
}
