package hostname

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	"github.com/bootagent/bootagent/internal/testenv"
)

// newRoot makes a root directory with a stock Debian /etc.
func newRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	hosts, err := os.ReadFile("testdata/hosts/debian.in")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/hosts"), hosts, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("debian\n"), 0o644))
	return root
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

func TestApplySetsEveryNameAndThenNothing(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	require.NoError(t, syscall.Sethostname([]byte("ip-10-0-7-10")))
	root := newRoot(t)
	m := New(context.Background(), root, zaptest.NewLogger(t))
	defer m.Close()
	n, err := Make("web01", "example.internal")
	require.NoError(t, err)
	policy := Policy{PreferFQDN: true, ManageEtcHosts: true}

	changes, err := m.Apply(context.Background(), n, policy)
	require.NoError(t, err)
	assert.Equal(t, []Change{
		{What: "/etc/hosts entry", Old: "", New: "127.0.1.1\tweb01.example.internal web01"},
		{What: "kernel hostname", Old: "ip-10-0-7-10", New: "web01.example.internal"},
		{What: "static hostname", Old: "debian", New: "web01.example.internal"},
	}, changes)
	kernel, err := os.Hostname()
	require.NoError(t, err)
	assert.Equal(t, "web01.example.internal", kernel)
	assert.Equal(t, "web01.example.internal\n", readFile(t, filepath.Join(root, "etc/hostname")))
	golden, err := os.ReadFile("testdata/hosts/debian.golden")
	require.NoError(t, err)
	assert.Equal(t, string(golden), readFile(t, filepath.Join(root, "etc/hosts")))

	changes, err = m.Apply(context.Background(), n, policy)
	require.NoError(t, err)
	assert.Empty(t, changes, "a second apply finds nothing to do")
}

func TestApplyRepairsDrift(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	root := newRoot(t)
	m := New(context.Background(), root, zaptest.NewLogger(t))
	n, err := Make("web01", "example.internal")
	require.NoError(t, err)
	policy := Policy{PreferFQDN: false, ManageEtcHosts: true}
	_, err = m.Apply(context.Background(), n, policy)
	require.NoError(t, err)

	// Something (a DHCP hook, a careless script) renames the host and
	// rewrites the managed entry.
	require.NoError(t, syscall.Sethostname([]byte("localhost")))
	hosts := filepath.Join(root, "etc/hosts")
	require.NoError(t, os.WriteFile(hosts, []byte(strings.Replace(readFile(t, hosts), "web01.example.internal web01", "other", 1)), 0o644))

	changes, err := m.Apply(context.Background(), n, policy)
	require.NoError(t, err)
	assert.Equal(t, []Change{
		{What: "/etc/hosts entry", Old: "127.0.1.1\tother", New: "127.0.1.1\tweb01.example.internal web01"},
		{What: "kernel hostname", Old: "localhost", New: "web01"},
	}, changes)
}

func TestApplyLeavesHostsAloneWhenNotManaged(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	root := newRoot(t)
	before := readFile(t, filepath.Join(root, "etc/hosts"))
	m := New(context.Background(), root, zaptest.NewLogger(t))
	n, err := Make("web01", "")
	require.NoError(t, err)
	_, err = m.Apply(context.Background(), n, Policy{PreferFQDN: true})
	require.NoError(t, err)
	assert.Equal(t, before, readFile(t, filepath.Join(root, "etc/hosts")))
}

func TestApplyStopsAtABrokenHostsFile(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	require.NoError(t, syscall.Sethostname([]byte("before")))
	root := newRoot(t)
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/hosts"), []byte(beginMarker+"\n"), 0o644))
	m := New(context.Background(), root, zaptest.NewLogger(t))
	n, err := Make("web01", "")
	require.NoError(t, err)
	_, err = m.Apply(context.Background(), n, Policy{ManageEtcHosts: true})
	require.ErrorContains(t, err, "is never closed")
	kernel, err := os.Hostname()
	require.NoError(t, err)
	assert.Equal(t, "before", kernel, "nothing is renamed when the hosts entry cannot be written")
}

func TestHostnameFQDNResolvesThroughTheManagedEntry(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	root := newRoot(t)
	m := New(context.Background(), root, zaptest.NewLogger(t))
	n, err := Make("web01", "example.internal")
	require.NoError(t, err)
	_, err = m.Apply(context.Background(), n, Policy{PreferFQDN: false, ManageEtcHosts: true})
	require.NoError(t, err)

	// In a private mount namespace, the root's hosts file stands in for
	// /etc/hosts; the real one is never touched.
	out, err := exec.Command("unshare", "--mount", "--", "sh", "-c",
		`mount --bind "$1" /etc/hosts && hostname && hostname -f`, "sh", filepath.Join(root, "etc/hosts")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, "web01\nweb01.example.internal\n", string(out))
}

func TestTameCloudInit(t *testing.T) {
	root := newRoot(t)
	m := New(context.Background(), root, zaptest.NewLogger(t))

	wrote, err := m.TameCloudInit()
	require.NoError(t, err)
	assert.False(t, wrote, "no cloud-init, no drop-in")

	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/cloud"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/cloud/cloud.cfg"), []byte("preserve_hostname: false\n"), 0o644))
	wrote, err = m.TameCloudInit()
	require.NoError(t, err)
	assert.True(t, wrote)
	dropIn := readFile(t, filepath.Join(root, "etc/cloud/cloud.cfg.d/99-bootagent.cfg"))
	assert.Contains(t, dropIn, "\npreserve_hostname: true\n")

	wrote, err = m.TameCloudInit()
	require.NoError(t, err)
	assert.False(t, wrote, "an up-to-date drop-in is not rewritten")
}

// slowHostnamed is a static-name setter that is not there yet, as
// hostnamed while D-Bus activates it; it records the kernel name at the
// moment the static name is set.
type slowHostnamed struct {
	static, kernelAtSet string
}

func (h *slowHostnamed) Static(context.Context) (string, error) { return h.static, nil }

func (h *slowHostnamed) SetStatic(_ context.Context, name string) error {
	h.kernelAtSet, _ = os.Hostname()
	h.static = name
	return nil
}

func TestTheKernelNameDoesNotWaitForHostnamed(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	require.NoError(t, syscall.Sethostname([]byte("localhost")))
	h := &slowHostnamed{static: "debian"}
	m := &Manager{root: newRoot(t), log: zaptest.NewLogger(t), ready: make(chan struct{})}
	n, err := Make("web01", "example.internal")
	require.NoError(t, err)

	type result struct {
		changes []Change
		err     error
	}
	done := make(chan result, 1)
	go func() {
		c, err := m.Apply(context.Background(), n, Policy{PreferFQDN: true, ManageEtcHosts: true})
		done <- result{c, err}
	}()
	// hostnamed answers only once the kernel carries the name: Apply
	// cannot be waiting for it before that, or this test would hang.
	testenv.Eventually(t, 10*time.Second, func() bool { k, _ := os.Hostname(); return k == "web01.example.internal" }, "the kernel name is set before hostnamed answers")
	m.static = h
	close(m.ready)
	r := <-done
	require.NoError(t, r.err)
	assert.Equal(t, "web01.example.internal", h.static, "the static name through hostnamed, once it answers")
	assert.Equal(t, "web01.example.internal", h.kernelAtSet)
	assert.Equal(t, []string{"/etc/hosts entry", "kernel hostname", "static hostname"}, []string{r.changes[0].What, r.changes[1].What, r.changes[2].What})
}

func TestApplyGivesUpWaitingForTheStaticNameWithItsContext(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	m := &Manager{root: newRoot(t), log: zaptest.NewLogger(t), ready: make(chan struct{})}
	n, err := Make("web01", "")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	changes, err := m.Apply(ctx, n, Policy{})
	require.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, "kernel hostname", changes[len(changes)-1].What, "the kernel name was set all the same")
}
