// Package crash kills `bootagent once` between every durable step of a
// bootstrap, as a power cut would, restarts it, and checks that the end is
// the same as an uninterrupted run's. It builds the agent with the
// faultinject tag, which arms the crash points.
package crash

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/internal/testenv"
)

// crashPoints are the places between durable steps, in the order a first
// boot passes them.
var crashPoints = []string{"key-written", "client-created", "node-created", "files-written", "validator-deleted", "state-saved"}

// faultBinary builds bootagent with the crash points armed.
func faultBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bootagent-faultinject")
	out, err := exec.Command("go", "build", "-tags", "faultinject", "-o", bin, "../../cmd/bootagent").CombinedOutput()
	require.NoError(t, err, "%s", out)
	return bin
}

type instance struct {
	root, config string
	goiardi      *testenv.Goiardi
	node         string
}

func newInstance(t *testing.T, g *testenv.Goiardi, imdsURL, node string) instance {
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/chef"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/hosts"), []byte("127.0.0.1\tlocalhost\n"), 0o644))
	g.PlaceValidator(t, root)
	config := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(config, fmt.Appendf(nil, "imds:\n  endpoint: %s\nchef:\n  server_url: %s\n  node_name: %s\n  client_command: [%q]\n",
		imdsURL, g.URL, node, testenv.Tool(t, "chefclient-standin")), 0o600))
	return instance{root: root, config: config, goiardi: g, node: node}
}

// once runs `bootagent once`, crashing at point when it is not "".
func (in instance) once(t *testing.T, bin, point string) (*os.ProcessState, string) {
	cmd := exec.Command(bin, "once", "--config", in.config, "--root", in.root)
	cmd.Env = append(os.Environ(), "BOOTAGENT_CRASH_AT="+point)
	out, _ := cmd.CombinedOutput()
	return cmd.ProcessState, string(out)
}

// endState is what must be the same after any crash and a restart.
type endState struct {
	Clients      int      // clients named like the node
	RunList      []string // the node's
	KeyMatches   bool     // client.pem is the key the server holds
	KeyMode      fs.FileMode
	TempFiles    []string
	Validator    bool // still on disk
	Registered   bool
	FirstRunDone bool
	InstanceID   string
}

func (in instance) end(t *testing.T) endState {
	var s endState
	for name := range in.goiardi.Clients(t) {
		if name == in.node {
			s.Clients++
		}
	}
	s.RunList = in.goiardi.Node(t, in.node).RunList
	keyPEM, err := os.ReadFile(filepath.Join(in.root, "etc/chef/client.pem"))
	require.NoError(t, err)
	key, err := chef.ParseKey(keyPEM)
	require.NoError(t, err)
	pub, err := chef.PublicKeyPEM(key)
	require.NoError(t, err)
	s.KeyMatches = strings.TrimSpace(pub) == strings.TrimSpace(in.goiardi.ClientPublicKey(t, in.node))
	fi, err := os.Stat(filepath.Join(in.root, "etc/chef/client.pem"))
	require.NoError(t, err)
	s.KeyMode = fi.Mode().Perm()
	require.NoError(t, filepath.WalkDir(in.root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.Contains(d.Name(), ".tmp-") {
			s.TempFiles = append(s.TempFiles, p)
		}
		return err
	}))
	_, err = os.Stat(filepath.Join(in.root, "etc/chef/validation.pem"))
	s.Validator = err == nil
	var st struct {
		InstanceID   string `json:"instance_id"`
		RegisteredAt *string
		FirstRunDone bool `json:"first_run_done"`
	}
	data, err := os.ReadFile(filepath.Join(in.root, "var/lib/bootagent/state.json"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(data, &st))
	var raw map[string]any
	require.NoError(t, json.Unmarshal(data, &raw))
	s.Registered = raw["registered_at"] != nil
	s.FirstRunDone, s.InstanceID = st.FirstRunDone, st.InstanceID
	return s
}

func TestACrashAtEveryStepEndsAsAnUninterruptedRun(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	bin := faultBinary(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=crash01\nchef_run_list=role[web],recipe[base]\n")})
	g := testenv.StartGoiardi(t)

	reference := newInstance(t, g, emu.URL, "reference")
	ps, out := reference.once(t, bin, "")
	require.True(t, ps.Success(), "an uninterrupted run succeeds:\n%s", out)
	want := reference.end(t)
	require.Equal(t, endState{Clients: 1, RunList: []string{"role[web]", "recipe[base]"}, KeyMatches: true, KeyMode: 0o600,
		Registered: true, FirstRunDone: true, InstanceID: "i-0123456789abcdef0"}, want)

	for _, point := range crashPoints {
		t.Run("a crash after "+point, func(t *testing.T) {
			in := newInstance(t, g, emu.URL, "crash-"+point)
			ps, out := in.once(t, bin, point)
			ws, ok := ps.Sys().(syscall.WaitStatus)
			require.True(t, ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL, "killed at %s:\n%s", point, out)

			ps, out = in.once(t, bin, "")
			require.True(t, ps.Success(), "the restart finishes the job:\n%s", out)
			assert.Equal(t, want, in.end(t))
		})
	}
}

// inMountNamespace runs script with sh in a private mount namespace, so
// that the small filesystems it mounts are seen by nothing else.
func inMountNamespace(t *testing.T, script string, env ...string) string {
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	return string(out)
}

func TestAFullOrReadOnlyFilesystemFailsCleanlyAndRecovers(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=disk01\nchef_run_list=role[web]\n")})
	g := testenv.StartGoiardi(t)
	bin := testenv.Tool(t, "bootagent")
	tests := []struct {
		name    string
		breakFS string // makes /etc/chef unwritable
		mend    string
		want    string
	}{
		// One page: the validator fits, the node's key does not.
		{"a full /etc/chef", "mount -t tmpfs -o size=4k tmpfs etc/chef", "mount -o remount,size=1m etc/chef", "no space left on device"},
		{"a read-only /etc/chef", "mount -t tmpfs -o size=1m tmpfs etc/chef && chmod 755 etc/chef && cp \"$VALIDATOR\" etc/chef/validation.pem && mount -o remount,ro etc/chef", "mount -o remount,rw etc/chef", "read-only file system"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := newInstance(t, g, emu.URL, fmt.Sprintf("disk-%d", i))
			validator := filepath.Join(t.TempDir(), "validation.pem")
			data, err := os.ReadFile(filepath.Join(in.root, "etc/chef/validation.pem"))
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(validator, data, 0o600))
			script := `cd "$ROOT" && ` + tt.breakFS + ` && { [ -e etc/chef/validation.pem ] || cp "$VALIDATOR" etc/chef/validation.pem; }
"$BIN" once --config "$CONFIG" --root "$ROOT" 2>&1; echo "first-exit=$?"
echo "listing:"; ls -A etc/chef
` + tt.mend + `
"$BIN" once --config "$CONFIG" --root "$ROOT" >/dev/null 2>&1; echo "second-exit=$?"
echo "after:"; ls -A etc/chef`
			out := inMountNamespace(t, script, "ROOT="+in.root, "CONFIG="+in.config, "BIN="+bin, "VALIDATOR="+validator)
			first, rest, _ := strings.Cut(out, "listing:")
			listing, _, _ := strings.Cut(rest, "second-exit=")
			_, after, _ := strings.Cut(out, "after:")
			assert.Contains(t, first, "first-exit=1", "a clear failure:\n%s", out)
			assert.Contains(t, first, tt.want)
			assert.Contains(t, first, "/etc/chef/client.pem", "the error names the file")
			assert.NotContains(t, listing, ".tmp-", "nothing half-written")
			assert.NotContains(t, listing, "client.pem", "no key written without its registration")
			assert.Contains(t, out, "second-exit=0", "recovered once the disk takes writes:\n%s", out)
			for _, f := range []string{"client.pem", "client.rb", "first-boot.json"} {
				assert.Contains(t, after, f)
			}
			assert.NotContains(t, after, ".tmp-")
			assert.NotEmpty(t, g.Clients(t)[in.node], "registered")
		})
	}
}
