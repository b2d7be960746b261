package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/internal/testenv"
)

// silentServer takes connections and never answers.
func silentServer(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // held open, never read or answered
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
	})
	return "http://" + l.Addr().String()
}

// bootagentWithin is bootagent, failing the test instead of hanging when
// the command does not end within limit.
func bootagentWithin(t *testing.T, limit time.Duration, args ...string) (int, string, string) {
	t.Helper()
	type result struct {
		code        int
		out, errOut string
	}
	done := make(chan result, 1)
	go func() {
		code, out, errOut := bootagent(t, "", args...)
		done <- result{code, out, errOut}
	}()
	select {
	case r := <-done:
		return r.code, r.out, r.errOut
	case <-time.After(limit):
		t.Fatalf("bootagent %s did not end within %s", strings.Join(args, " "), limit)
		return 0, "", ""
	}
}

func TestOnceGivesUpOnASilentChefServerAtItsBudget(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=cli01\n")})
	server := silentServer(t)
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/chef"), 0o755))
	key, err := chef.GenerateKey()
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/chef/validation.pem"), key, 0o600))
	cfg := writeConfig(t, fmt.Sprintf("imds:\n  endpoint: %s\nchef:\n  server_url: %s\n  request_budget: 2s\n", emu.URL, server))

	code, _, stderr := bootagentWithin(t, time.Minute, "once", "--config", cfg, "--root", root)
	assert.Equal(t, 1, code, stderr)
	assert.Contains(t, stderr, "POST "+server+"/clients: no answer in time")
	assert.Contains(t, stderr, "(gave up within chef.request_budget, 2s)")
}

func TestOversizedUserDataIsInvalidInputAndSaysItsSize(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	big := "hostname=cli01\n" + strings.Repeat("#", 2<<20)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte(big)})
	cfg := writeConfig(t, "imds:\n  endpoint: "+emu.URL+"\n")

	code, _, stderr := bootagentWithin(t, time.Minute, "once", "--config", cfg, "--root", t.TempDir())
	assert.Equal(t, 2, code, "no retry makes it smaller: %s", stderr)
	assert.Contains(t, stderr, fmt.Sprintf("user-data: %d bytes is more than the 1048576 bootagent reads", len(big)))

	path := filepath.Join(t.TempDir(), "user-data")
	require.NoError(t, os.WriteFile(path, []byte(big), 0o600))
	code, _, stderr = bootagent(t, "", "userdata", "check", path)
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, fmt.Sprintf("user-data: %d bytes is more than the 1048576 bootagent reads", len(big)))
	code, _, stderr = bootagent(t, big, "userdata", "check", "-")
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, fmt.Sprintf("user-data: %d bytes is more than the 1048576 bootagent reads", len(big)))
}

func TestAFailureIsPrintedOnce(t *testing.T) {
	cfg := writeConfig(t, "imds:\n  endpoint: http://127.0.0.1:1\n  wait_timeout: 1s\n")

	code, _, stderr := bootagentWithin(t, time.Minute, "once", "--config", cfg, "--root", t.TempDir())
	assert.Equal(t, 1, code)
	const failure = "IMDS did not answer within 1s (imds.wait_timeout)"
	assert.Equal(t, 1, strings.Count(stderr, failure), "stderr:\n%s", stderr)
}
