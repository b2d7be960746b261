package agent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

const debianHosts = "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n\n::1     localhost ip6-localhost ip6-loopback\n"

// newRoot makes a root with a stock Debian /etc.
func newRoot(t testing.TB) string {
	t.Helper()
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/hosts"), []byte(debianHosts), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("debian\n"), 0o644))
	return root
}

// newEngine points an Engine at an IMDS emulator serving the given config.
func newEngine(t testing.TB, m testenv.IMDSConfig, root string, mod ...func(*config.Config)) (*Engine, *observer.ObservedLogs) {
	t.Helper()
	return newEngineWith(t, m, root, nil, mod...)
}

// newEngineWith is newEngine with the Engine's options changed by opts
// (when not nil) after the configuration is made.
func newEngineWith(t testing.TB, m testenv.IMDSConfig, root string, opts func(*Options), mod ...func(*config.Config)) (*Engine, *observer.ObservedLogs) {
	t.Helper()
	testenv.RequirePrivateUTS(t)
	require.NoError(t, syscall.Sethostname([]byte("localhost")))
	emu := testenv.StartIMDS(t, m)
	cfg := config.Default()
	cfg.IMDS.Endpoint = emu.URL
	cfg.IMDS.PollInterval = config.Duration(100 * time.Millisecond)
	for _, f := range mod {
		f(&cfg)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(zapcore.NewTee(core, zaptest.NewLogger(t).Core()))
	o := Options{Config: cfg, Root: root, Log: log}
	if opts != nil {
		opts(&o)
	}
	e := New(context.Background(), o)
	t.Cleanup(e.Close)
	return e, logs
}

func kernelHostname(t *testing.T) string {
	t.Helper()
	h, err := os.Hostname()
	require.NoError(t, err)
	return h
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

func TestOnceAppliesTheHostnameFromEveryUserDataForm(t *testing.T) {
	mime := "Content-Type: multipart/mixed; boundary=\"==B==\"\nMIME-Version: 1.0\n\n" +
		"--==B==\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho hi\n" +
		"--==B==\nContent-Type: text/x-bootagent\n\nhostname=mime01\ndomain=example.internal\n--==B==--\n"
	tests := []struct {
		name       string
		userData   []byte
		wantKernel string
		wantHosts  string
	}{
		{"key=value", []byte("hostname=kv01\ndomain=example.internal\n"), "kv01.example.internal", "127.0.1.1\tkv01.example.internal kv01"},
		{"JSON", []byte(`{"fqdn": "json01.example.internal"}`), "json01.example.internal", "127.0.1.1\tjson01.example.internal json01"},
		{"cloud-config", []byte("#cloud-config\nhostname: cc01\nfqdn: cc01.example.internal\nprefer_fqdn_over_hostname: false\n"), "cc01", "127.0.1.1\tcc01.example.internal cc01"},
		{"MIME multipart", []byte(mime), "mime01.example.internal", "127.0.1.1\tmime01.example.internal mime01"},
		{"gzip", testenv.Gzip(t, "#cloud-config\nfqdn: gz01.example.internal\n"), "gz01.example.internal", "127.0.1.1\tgz01.example.internal gz01"},
		{"none, so IMDS local-hostname", nil, "ip-10-0-7-10.eu-west-1.compute.internal", "127.0.1.1\tip-10-0-7-10.eu-west-1.compute.internal ip-10-0-7-10"},
		{"a shell script, so IMDS local-hostname", []byte("#!/bin/sh\nexit 0\n"), "ip-10-0-7-10.eu-west-1.compute.internal", "127.0.1.1\tip-10-0-7-10.eu-west-1.compute.internal ip-10-0-7-10"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := newRoot(t)
			e, _ := newEngine(t, testenv.IMDSConfig{InstanceID: "i-0aaaabbbbccccdddd", UserData: tt.userData}, root)

			res, err := e.Once(context.Background())
			require.NoError(t, err)
			assert.Equal(t, "i-0aaaabbbbccccdddd", res.Identity.InstanceID)
			assert.Equal(t, tt.wantKernel, kernelHostname(t), "kernel hostname")
			assert.Equal(t, tt.wantKernel+"\n", readFile(t, filepath.Join(root, "etc/hostname")))
			hosts := readFile(t, filepath.Join(root, "etc/hosts"))
			assert.Contains(t, hosts, "\n"+tt.wantHosts+"\n")
			assert.True(t, strings.HasPrefix(hosts, "127.0.0.1\tlocalhost\n"), "the administrator's lines stay:\n%s", hosts)
			assert.Contains(t, hosts, "127.0.1.1\tdebian\n")
			require.Len(t, res.Steps, 3)
			assert.Equal(t, []string{"imds", "user-data", "hostname"}, []string{res.Steps[0].Name, res.Steps[1].Name, res.Steps[2].Name})
		})
	}
}

func TestOnceNamesTheInstanceFromATag(t *testing.T) {
	root := newRoot(t)
	e, _ := newEngine(t, testenv.IMDSConfig{Tags: map[string]string{"Name": "Tagged-01"}}, root, func(c *config.Config) {
		c.Hostname.FromTag = "Name"
		c.Hostname.Domain = "example.internal"
	})
	res, err := e.Once(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "tagged-01.example.internal", kernelHostname(t))
	assert.Equal(t, "instance tag Name", res.HostnameSource)
}

func TestOnceFallsBackFromAMissingTagToIMDS(t *testing.T) {
	root := newRoot(t)
	e, logs := newEngine(t, testenv.IMDSConfig{}, root, func(c *config.Config) {
		c.Hostname.FromTag = "Name"
		c.Hostname.Domain = "corp.internal"
	})
	_, err := e.Once(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "ip-10-0-7-10.corp.internal", kernelHostname(t), "the baked domain replaces EC2's")
	assert.Equal(t, 1, logs.FilterMessage("no name from the instance tag").Len())
}

func TestOnceLeavesTheNameAloneWhenAsked(t *testing.T) {
	tests := []struct {
		name     string
		userData []byte
		mod      func(*config.Config)
	}{
		{"preserve_hostname in cloud-config", []byte("#cloud-config\npreserve_hostname: true\nhostname: ignored\n"), nil},
		{"fallback keep and no name", nil, func(c *config.Config) { c.Hostname.Fallback = config.FallbackKeep }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := newRoot(t)
			var mods []func(*config.Config)
			if tt.mod != nil {
				mods = append(mods, tt.mod)
			}
			e, _ := newEngine(t, testenv.IMDSConfig{UserData: tt.userData}, root, mods...)
			res, err := e.Once(context.Background())
			require.NoError(t, err)
			assert.True(t, res.Hostname.IsZero())
			assert.Equal(t, "localhost", kernelHostname(t))
			assert.Equal(t, debianHosts, readFile(t, filepath.Join(root, "etc/hosts")))
		})
	}
}

func TestOnceRefusesBadInputAndWritesNothing(t *testing.T) {
	tests := []struct {
		name     string
		userData []byte
		want     string
	}{
		{"a hostile hostname", []byte("hostname=web01;reboot\n"), "user-data (key=value) line 1 key hostname: invalid host name"},
		{"a hostile domain", []byte("#cloud-config\nhostname: web01\nbootagent:\n  hostname:\n    domain: \"a b\"\n"), "bootagent block line 5: domain invalid host name"},
		{"a truncated gzip", testenv.Gzip(t, strings.Repeat("hostname=web01\n", 50))[:40], "user-data: gzip"},
		{"invalid UTF-8", []byte("hostname=w\xffb\n"), "not valid UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := newRoot(t)
			e, _ := newEngine(t, testenv.IMDSConfig{UserData: tt.userData}, root)
			_, err := e.Once(context.Background())
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			assert.Equal(t, 2, ExitCode(err))
			assert.Equal(t, "localhost", kernelHostname(t), "kernel hostname untouched")
			assert.Equal(t, debianHosts, readFile(t, filepath.Join(root, "etc/hosts")))
			assert.Equal(t, "debian\n", readFile(t, filepath.Join(root, "etc/hostname")))
		})
	}
}

func TestRunReappliesTheHostnameWhenItDrifts(t *testing.T) {
	root := newRoot(t)
	e, logs := newEngine(t, testenv.IMDSConfig{UserData: []byte("fqdn=web01.example.internal\n")}, root)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()

	testenv.Eventually(t, 10*time.Second, func() bool { return logs.FilterMessage("hostname applied").Len() == 1 }, "the first pass applies the name")
	require.NoError(t, syscall.Sethostname([]byte("drifted")))
	hosts := filepath.Join(root, "etc/hosts")
	require.NoError(t, os.WriteFile(hosts, []byte(strings.ReplaceAll(readFile(t, hosts), "web01", "evil")), 0o644))

	testenv.Eventually(t, 5*time.Second, func() bool {
		return logs.FilterMessage("hostname drift corrected").Len() == 2
	}, "drift corrected for the kernel name and the hosts entry")
	cancel()
	require.NoError(t, <-done)

	assert.Equal(t, "web01.example.internal", kernelHostname(t))
	assert.Contains(t, readFile(t, hosts), "127.0.1.1\tweb01.example.internal web01\n")
	var what []string
	for _, l := range logs.FilterMessage("hostname drift corrected").All() {
		what = append(what, l.ContextMap()["what"].(string)+": "+l.ContextMap()["old"].(string))
	}
	assert.ElementsMatch(t, []string{"kernel hostname: drifted", "/etc/hosts entry: 127.0.1.1\tevil.example.internal evil"}, what)
}

func TestRunEndsOnInvalidUserData(t *testing.T) {
	root := newRoot(t)
	e, _ := newEngine(t, testenv.IMDSConfig{UserData: []byte("hostnme=typo\n")}, root)
	err := e.Run(context.Background())
	require.ErrorIs(t, err, config.ErrInvalid)
	assert.Equal(t, 2, ExitCode(err))
}

func TestTheEffectiveConfigurationLogsNoAttributeValues(t *testing.T) {
	userData := `{"hostname": "web01", "chef_initial_attributes": {"db": {"password": "hunter2-s3cret"}}}`
	e, logs := newEngine(t, testenv.IMDSConfig{UserData: []byte(userData)}, newRoot(t))
	_, err := e.Once(context.Background())
	require.NoError(t, err)

	lines := logs.FilterMessage("effective configuration").All()
	require.Len(t, lines, 1)
	logged, err := json.Marshal(lines[0].ContextMap()["config"])
	require.NoError(t, err)
	assert.NotContains(t, string(logged), "hunter2-s3cret")
	assert.Contains(t, string(logged), `"initial_attributes":{"db":"(redacted)"}`, "the keys are shown")
}
