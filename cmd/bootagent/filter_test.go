package main

import (
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

// nft runs nft in the test's own network namespace.
func nft(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(testenv.Tool(t, "nft"), args...).CombinedOutput()
	require.NoError(t, err, "nft %s: %s", strings.Join(args, " "), out)
	return string(out)
}

// tokenAs asks IMDS at endpoint for a token as uid, with bash's /dev/tcp
// in a process of that user (setpriv), and returns the answer's status
// line or why there was none.
func tokenAs(t *testing.T, uid, endpoint string) string {
	t.Helper()
	u, err := url.Parse(endpoint)
	require.NoError(t, err)
	script := `exec 3<>"/dev/tcp/$1/$2" || exit 1
printf 'PUT /latest/api/token HTTP/1.1\r\nHost: %s\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' "$1" >&3
head -n1 <&3`
	cmd := exec.Command(testenv.Tool(t, "setpriv"), "--reuid", uid, "--regid", uid, "--clear-groups", "--",
		"timeout", "10", "bash", "-c", script, "bash", u.Hostname(), u.Port())
	out, _ := cmd.CombinedOutput()
	return strings.TrimSpace(string(out))
}

// withoutOurTable is `nft list ruleset` without the agent's table.
func withoutOurTable(listing string) string {
	start := strings.Index(listing, "table inet bootagent {")
	if start < 0 {
		return listing
	}
	end := strings.Index(listing[start:], "\n}\n")
	return listing[:start] + listing[start+end+len("\n}\n"):]
}

func TestAllowUsersKeepsIMDSForRootAndPutsTheFilterBack(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	testenv.RequireOwnFirewall(t)
	nft(t, "add", "table", "inet", "mine")
	t.Cleanup(func() { _ = exec.Command("nft", "delete", "table", "inet", "mine").Run() })
	nft(t, "add", "chain", "inet", "mine", "out", "{ type filter hook output priority 0; policy accept; }")
	nft(t, "add", "rule", "inet", "mine", "out", "tcp dport 9 counter accept")
	before := nft(t, "list", "ruleset")

	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=fw01\n")})
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "200 OK", "without the filter nobody reaches IMDS")
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	cfg := writeConfig(t, "imds:\n  endpoint: "+emu.URL+"\n  poll_interval: 200ms\n  allow_users: [root]\n")
	stderr := &testenv.SyncBuffer{}
	cmd := exec.Command(testenv.Tool(t, "bootagent"), "run", "--config", cfg, "--root", root)
	cmd.Stderr = stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	testenv.Eventually(t, 20*time.Second, func() bool { return strings.Contains(stderr.String(), "hostname applied") }, "the agent reads its user-data: %s", testenv.Later(stderr.String))
	assert.Contains(t, stderr.String(), "\tIMDS filtered\t")
	assert.Less(t, strings.Index(stderr.String(), "IMDS filtered"), strings.Index(stderr.String(), "user-data read"), "filtered before user-data is read")

	assert.Contains(t, tokenAs(t, "0", emu.URL), "HTTP/1.1 200 OK", "root reaches IMDS")
	start := time.Now()
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "Connection refused", "nobody is refused")
	assert.Less(t, time.Since(start), 5*time.Second, "at once, not after a timeout")
	assert.Equal(t, before, withoutOurTable(nft(t, "list", "ruleset")), "no other table changes")

	code, out, _ := bootagent(t, "", "status", "--root", root, "--wait=20s")
	assert.Equal(t, 0, code, "bootstrapped: %s", out)
	assert.Regexp(t, `imds filter\s+IMDS \(127\.0\.0\.1:\d+, 169\.254\.169\.254:80, \[fd00:ec2::254\]:80\) only for root \(0\)`, out)
	code, out, _ = bootagent(t, "", "diagnose", "--config", cfg, "--root", root)
	assert.Contains(t, []int{0, 1}, code)
	assert.Regexp(t, `(?m)^ok\s+IMDS filter\s+.*127\.0\.0\.1:\d+: uid 0 connects, uid 65534 is refused$`, out)

	nft(t, "delete", "table", "inet", "bootagent")
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "200 OK", "deleted by hand, the filter is gone")
	testenv.Eventually(t, 10*time.Second, func() bool { return strings.Contains(stderr.String(), "the IMDS filter was missing or changed") },
		"the agent puts the filter back: %s", testenv.Later(stderr.String))
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "Connection refused", "refused again")
	assert.Contains(t, tokenAs(t, "0", emu.URL), "200 OK")

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, cmd.Wait())
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "Connection refused", "the filter outlives the agent: a restart is no opening")
	code, out, stderr2 := bootagent(t, "", "clean", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr2)
	assert.Contains(t, out, "removed nftables table inet bootagent")
	assert.Equal(t, before, nft(t, "list", "ruleset"), "clean removes the table and nothing else")
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "200 OK")
}

func TestAnEmptyAllowUsersRemovesTheFilter(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	testenv.RequireOwnFirewall(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{Address: "::1", UserData: []byte("imds_allow_users=root\nhostname=fw02\n")})
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", emu.URL)
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
	cfg := writeConfig(t, "imds:\n  wait_timeout: 10s\n")

	code, _, stderr := bootagent(t, "", "once", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stderr, "IMDS filtered", "key=value user-data sets imds_allow_users")
	assert.Contains(t, tokenAs(t, "0", emu.URL), "200 OK", "root reaches IMDS over IPv6")
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "Connection refused", "nobody is refused over IPv6, at the endpoint the environment names")

	open := testenv.StartIMDS(t, testenv.IMDSConfig{Address: "::1", UserData: []byte("imds_allow_users=\nhostname=fw02\n")})
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", open.URL)
	code, _, stderr = bootagent(t, "", "once", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stderr, "IMDS is open to every user again")
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "200 OK")

	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", emu.URL)
	code, _, stderr = bootagent(t, "", "once", "--config", cfg, "--root", root)
	require.Equal(t, 0, code, stderr)
	code, out, _ := bootagent(t, "", "filter", "remove")
	require.Equal(t, 0, code)
	assert.Equal(t, "removed nftables table inet bootagent: every user reaches IMDS again\n", out)
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "200 OK")
	_, out, _ = bootagent(t, "", "filter", "remove")
	assert.Equal(t, "no nftables table inet bootagent: IMDS was not filtered\n", out)
}

func TestFilterApplyInstallsWhatTheConfigFileSays(t *testing.T) {
	testenv.RequireOwnFirewall(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{})
	cfg := writeConfig(t, "imds:\n  endpoint: "+emu.URL+"\n  allow_users: [root]\n")
	t.Cleanup(func() { bootagent(t, "", "filter", "remove") })
	code, _, stderr := bootagent(t, "", "filter", "apply", "--config", cfg)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stderr, "IMDS filtered")
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "Connection refused")
	assert.Contains(t, tokenAs(t, "0", emu.URL), "200 OK")
	code, _, stderr = bootagent(t, "", "filter", "apply", "--config", cfg)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stderr, "IMDS filter already in place")

	code, _, stderr = bootagent(t, "", "filter", "apply", "--config", writeConfig(t, "imds:\n  endpoint: "+emu.URL+"\n"))
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stderr, "nothing to apply")
	assert.Contains(t, tokenAs(t, "65534", emu.URL), "Connection refused", "an empty list in the file leaves a table user-data may have asked for")

	code, _, stderr = bootagent(t, "", "filter", "apply", "--config", writeConfig(t, "imds:\n  endpoint: http://imds.internal\n  allow_users: [root]\n"))
	assert.Equal(t, 2, code, "a config the filter cannot follow is invalid")
	assert.Contains(t, stderr, "names its host by name")
}
