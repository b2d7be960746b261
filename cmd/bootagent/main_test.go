package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

// bootagent runs a command line in-process and returns its exit status,
// standard output and standard error.
func bootagent(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(args, strings.NewReader(stdin), &out, &errOut, nil)
	return code, out.String(), errOut.String()
}

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	return path
}

func TestUsageErrorsExitTwo(t *testing.T) {
	for _, args := range [][]string{{}, {"frobnicate"}, {"once", "extra"}, {"once", "--no-such-flag"}, {"userdata"}, {"userdata", "check", "a", "b"}} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			code, _, stderr := bootagent(t, "", args...)
			assert.Equal(t, 2, code)
			assert.Contains(t, stderr, "usage:")
		})
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := bootagent(t, "", "version")
	assert.Equal(t, 0, code)
	assert.Regexp(t, `^bootagent \S+ \(go1\.`, out)
}

func TestAnInvalidConfigFileExitsTwoWithItsLine(t *testing.T) {
	cfg := writeConfig(t, "imds:\n  token_ttl: 1h\n  tokn: x\n")
	code, _, stderr := bootagent(t, "", "once", "--config", cfg, "--root", t.TempDir())
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, `line 3: unknown key "tokn" in imds`)
}

func TestANamedConfigFileMustExist(t *testing.T) {
	code, _, stderr := bootagent(t, "", "userdata", "check", "--config", filepath.Join(t.TempDir(), "missing.yaml"), "-")
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "no such file")
}

func TestUserdataCheck(t *testing.T) {
	cfg := writeConfig(t, "hostname:\n  domain: corp.internal\n")
	code, out, stderr := bootagent(t, "hostname=web01\nchef_run_list=role[web]\n", "userdata", "check", "--config", cfg)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, out, "web01.corp.internal")
	assert.Contains(t, out, "127.0.1.1 web01.corp.internal web01")

	code, out, stderr = bootagent(t, "#cloud-config\nfqdn: db01.example.internal\n", "userdata", "check", "--config", cfg, "--json", "-")
	require.Equal(t, 0, code, stderr)
	var got struct {
		UserData struct{ Format string } `json:"user_data"`
		Hostname struct{ FQDN, Kernel string }
	}
	require.NoError(t, json.Unmarshal([]byte(out), &got))
	assert.Equal(t, "#cloud-config", got.UserData.Format)
	assert.Equal(t, "db01.example.internal", got.Hostname.FQDN)
}

func TestUserdataCheckReadsAFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "user-data")
	require.NoError(t, os.WriteFile(path, testenv.Gzip(t, "fqdn=web02.example.internal\n"), 0o600))
	code, out, stderr := bootagent(t, "", "userdata", "check", path)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, out, "gzip > key=value")
	assert.Contains(t, out, "web02.example.internal")
}

func TestUserdataCheckRefusesBrokenInputWithExitTwo(t *testing.T) {
	tests := []struct {
		name, data, want string
	}{
		{"a hostile hostname", "hostname=$(reboot)\n", `key hostname: invalid host name: "$(reboot)"`},
		{"a newline smuggled in JSON", `{"hostname": "web01\nevil"}`, `has '\n'`},
		{"a truncated gzip", string(testenv.Gzip(t, strings.Repeat("hostname=a\n", 40))[:30]), "gzip"},
		{"MIME without a boundary", "Content-Type: multipart/mixed\n\n--x\n", "without a boundary"},
		{"a YAML bomb", "#cloud-config\na: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nbootagent:\n  chef:\n    initial_attributes: {k: [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]}\n", "excessive aliasing"},
		{"16 MiB of user-data", strings.Repeat("#", 16<<20), "more than the 1048576 bootagent reads"},
		{"invalid UTF-8", "#cloud-config\nhostname: \xfe\n", "not valid UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out, stderr := bootagent(t, tt.data, "userdata", "check", "-")
			assert.Equal(t, 2, code)
			assert.Empty(t, out)
			assert.Contains(t, stderr, tt.want)
		})
	}
}

func TestOnceAgainstTheEmulator(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	require.NoError(t, syscall.Sethostname([]byte("localhost")))
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=cli01\ndomain=example.internal\n")})
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	cfg := writeConfig(t, "imds:\n  endpoint: "+emu.URL+"\n")

	code, out, stderr := bootagent(t, "", "once", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, out, "cli01.example.internal (from user-data (key=value) line 1 key hostname)")
	assert.Contains(t, stderr, "hostname applied")
	assert.Contains(t, stderr, `"instance_id": "i-0123456789abcdef0"`)
	h, err := os.Hostname()
	require.NoError(t, err)
	assert.Equal(t, "cli01.example.internal", h)
}

func TestOnceExitsTwoOnBadUserDataAndChangesNothing(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	require.NoError(t, syscall.Sethostname([]byte("localhost")))
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("#cloud-config\nhostname: \"web01 && reboot\"\n")})
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", emu.URL)

	code, _, stderr := bootagent(t, "", "once", "--config", writeConfig(t, ""), "--root", root)
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, `user-data #cloud-config line 2 key hostname: invalid host name: "web01 && reboot"`)
	entries, err := os.ReadDir(filepath.Join(root, "etc"))
	require.NoError(t, err)
	assert.Empty(t, entries, "nothing written")
	h, err := os.Hostname()
	require.NoError(t, err)
	assert.Equal(t, "localhost", h)
}

func TestOnceRegistersWithTheChefServer(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("#cloud-config\nfqdn: cli01.example.internal\nchef:\n  run_list: [\"role[web]\"]\n")})
	g := testenv.StartGoiardi(t)
	root := t.TempDir()
	g.PlaceValidator(t, root)
	for _, tt := range []struct {
		exit     string
		wantCode int
		wantOut  string
	}{
		{"0", 0, "chef-client run"},
		{"1", 1, "failed (exit code 1)"},
	} {
		cfg := writeConfig(t, fmt.Sprintf("imds:\n  endpoint: %s\nchef:\n  server_url: %s\n  client_command: [%q, --exit, %q]\n", emu.URL, g.URL, testenv.Tool(t, "chefclient-standin"), tt.exit))
		code, out, stderr := bootagent(t, "", "once", "--config", cfg, "--root", root)
		assert.Equal(t, tt.wantCode, code, stderr)
		assert.Contains(t, out+stderr, tt.wantOut)
	}
	assert.Equal(t, []string{"role[web]"}, g.Node(t, "cli01.example.internal").RunList)
}

func TestStatusAndClean(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	root := t.TempDir()
	code, out, _ := bootagent(t, "", "status", "--root", root)
	assert.Equal(t, 2, code, "nothing done yet is in progress")
	assert.Contains(t, out, "the agent has not run on this machine")

	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=st01\n")})
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	cfg := writeConfig(t, "imds:\n  endpoint: "+emu.URL+"\n")
	code, _, stderr := bootagent(t, "", "once", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr)

	code, out, _ = bootagent(t, "", "status", "--root", root, "--wait=1m")
	assert.Equal(t, 0, code)
	assert.Contains(t, out, "bootstrapped  true")
	assert.Contains(t, out, "hostname      st01 (from user-data (key=value) line 1 key hostname)")
	code, out, _ = bootagent(t, "", "status", "--root", root, "--json")
	assert.Equal(t, 0, code)
	var st struct {
		Phase        string
		Bootstrapped bool
		InstanceID   string `json:"instance_id"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, "idle", st.Phase)
	assert.Equal(t, "i-0123456789abcdef0", st.InstanceID)

	code, out, stderr = bootagent(t, "", "clean", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, out, "removed /var/lib/bootagent/state.json")
	code, _, _ = bootagent(t, "", "status", "--root", root)
	assert.Equal(t, 2, code)
}

func TestStatusWaitsThenSaysInProgressOrFailed(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "var/lib/bootagent")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	write := func(phase string) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "state.json"), []byte(`{"version": 1, "phase": "`+phase+`", "bootstrapped": false, "instance_id": "i-0abc"}`), 0o644))
	}
	write("registering")
	code, out, _ := bootagent(t, "", "status", "--root", root, "--wait=300ms")
	assert.Equal(t, 2, code, "still in progress when the wait ends")
	assert.Contains(t, out, "registering")

	write("failed")
	code, _, _ = bootagent(t, "", "status", "--root", root, "--wait")
	assert.Equal(t, 1, code, "a failure ends the wait")
}

func TestDeregisterCommand(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("fqdn=dr01.example.internal\n")})
	g := testenv.StartGoiardi(t)
	root := t.TempDir()
	g.PlaceValidator(t, root)
	cfg := writeConfig(t, fmt.Sprintf("imds:\n  endpoint: %s\nchef:\n  server_url: %s\n  client_command: [%q]\n", emu.URL, g.URL, testenv.Tool(t, "chefclient-standin")))

	code, out, stderr := bootagent(t, "", "deregister", "--config", cfg, "--root", root)
	assert.Equal(t, 1, code, "nothing registered yet")
	assert.Contains(t, stderr, "not registered")
	assert.Empty(t, out)

	code, _, stderr = bootagent(t, "", "once", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr)
	code, out, stderr = bootagent(t, "", "deregister", "--config", cfg, "--root", root, "--timeout", "30s")
	require.Equal(t, 0, code, stderr)
	assert.Equal(t, "node and client deleted from the Chef server\n", out)
	assert.Empty(t, g.Clients(t)["dr01.example.internal"])
	code, out, _ = bootagent(t, "", "status", "--root", root)
	assert.Equal(t, 0, code)
	assert.Contains(t, out, "node deleted true, client deleted true (bootagent deregister)")
}

func TestDiagnoseExitsOneWhenSomethingIsWrong(t *testing.T) {
	testenv.RequirePrivateNetwork(t)
	// Nothing listens on the discard port: IMDS is unreachable.
	cfg := writeConfig(t, "imds:\n  endpoint: http://127.0.0.1:9\n")
	code, out, _ := bootagent(t, "", "diagnose", "--config", cfg, "--root", t.TempDir())
	assert.Equal(t, 1, code)
	assert.Regexp(t, `(?m)^FAIL\s+IMDS reachable\s+http://127.0.0.1:9 does not answer`, out)
	assert.Contains(t, out, "fix: check the instance's metadata options")
}

func TestIMDSIsNeverReachedThroughTheEnvironmentsProxy(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	// 192.0.2.10 is this namespace's own, but not loopback: a client that
	// took the environment's proxy would send IMDS's requests there.
	testenv.AddLocalAddress(t, "192.0.2.10/32")
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{Address: "192.0.2.10", UserData: []byte("hostname=cli01\n")})
	var mu sync.Mutex
	var proxied []string
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		proxied = append(proxied, r.Method+" "+r.URL.String())
		mu.Unlock()
		http.Error(w, "proxy says no", http.StatusBadGateway)
	}))
	t.Cleanup(proxy.Close)
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	// Bounded, so that IMDS taken through the proxy fails the test soon.
	cfg := writeConfig(t, "imds:\n  endpoint: "+emu.URL+"\n  wait_timeout: 10s\n")

	// A process of its own: Go's net/http reads the proxy environment once
	// per process.
	cmd := exec.Command(testenv.Tool(t, "bootagent"), "once", "--config", cfg, "--root", root)
	cmd.Env = append(os.Environ(), "HTTP_PROXY="+proxy.URL, "http_proxy="+proxy.URL, "HTTPS_PROXY="+proxy.URL, "NO_PROXY=", "no_proxy=")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "hostname applied")
	mu.Lock()
	defer mu.Unlock()
	assert.Empty(t, proxied, "IMDS is reached directly, never through a proxy")
}

func TestTheIPv6EndpointModeReachesIMDSOverIPv6(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{Address: "::1", UserData: []byte("hostname=cli06\n")})
	require.True(t, strings.HasPrefix(emu.URL, "http://[::1]:"), emu.URL)
	// The SDK's variables, as an AMI's environment would give them: the
	// endpoint stands in for [fd00:ec2::254], which is never reached here.
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", emu.URL)
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	cfg := writeConfig(t, "imds:\n  wait_timeout: 10s\n")

	code, out, stderr := bootagent(t, "", "diagnose", "--json", "--config", cfg, "--root", root)
	require.Contains(t, []int{0, 1}, code, stderr)
	assert.Contains(t, out, emu.URL+" (endpoint mode ipv6, which the endpoint overrides) answers", "diagnose shows the mode, and IMDS answered over IPv6")
	code, _, stderr = bootagent(t, "", "once", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stderr, "hostname applied")

	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv5")
	code, _, stderr = bootagent(t, "", "once", "--config", cfg, "--root", root)
	assert.Equal(t, 2, code, "a mode the SDK does not know is invalid input")
	assert.Contains(t, stderr, `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE: "IPv5" is not ipv4 or ipv6`)
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "")
	code, out, _ = bootagent(t, "", "diagnose", "--json", "--config", writeConfig(t, "imds:\n  endpoint_mode: ipv6\n"), "--root", root)
	require.Contains(t, []int{0, 1}, code)
	assert.Contains(t, out, "endpoint mode ipv6", "the config file's key says the same")
}
