package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

// tokenCatcher is a proxy in front of the IMDS emulator that keeps the
// session tokens it hands out, so that the logs can be searched for them.
type tokenCatcher struct {
	mu     sync.Mutex
	tokens []string
	URL    string
}

func newTokenCatcher(t *testing.T, target string) *tokenCatcher {
	u, err := url.Parse(target)
	require.NoError(t, err)
	c := &tokenCatcher{}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(res *http.Response) error {
		if res.Request.Method != http.MethodPut {
			return nil
		}
		body, err := io.ReadAll(res.Body)
		if err != nil {
			return err
		}
		res.Body = io.NopCloser(bytes.NewReader(body))
		c.mu.Lock()
		c.tokens = append(c.tokens, string(body))
		c.mu.Unlock()
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	c.URL = srv.URL
	return c
}

// secret returns a recognisable piece of a PEM key's body.
func secret(t *testing.T, pemData string) string {
	lines := strings.Split(strings.TrimSpace(pemData), "\n")
	require.Greater(t, len(lines), 3)
	return lines[2]
}

func TestALifeOverTLSLeaksNoSecretAndKeepsKeysPrivate(t *testing.T) {
	g, ca := testenv.StartGoiardiTLS(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{Command: []string{"asglifecycle", "--asg-termination-delay-sec", "4"}, UserData: []byte("hostname=sec01\nchef_run_list=role[web]\n")})
	catcher := newTokenCatcher(t, emu.URL)
	root := newRoot(t)
	g.PlaceValidator(t, root)
	caData, err := os.ReadFile(ca)
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/bootagent"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/bootagent/chef-ca.pem"), caData, 0o644))
	record := filepath.Join(t.TempDir(), "runs.jsonl")

	e, logs := newEngine(t, testenv.IMDSConfig{}, root, func(c *config.Config) {
		c.IMDS.Endpoint = catcher.URL
		c.IMDS.PollInterval = config.Duration(200 * time.Millisecond)
		c.Chef.ServerURL = g.URL
		c.Chef.TrustedCerts = "/etc/bootagent/chef-ca.pem"
		c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin"), "--record", record}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()

	testenv.Eventually(t, 20*time.Second, func() bool {
		st, err := ReadState(root)
		return err == nil && st.LastRun != nil && st.LastRun.Result == "success"
	}, "registered and converged over TLS, the stand-in trusting the CA through client.rb")
	clientKey := readFile(t, filepath.Join(root, "etc/chef/client.pem"))
	fi, err := os.Stat(filepath.Join(root, "etc/chef/client.pem"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "client.pem is the node's identity")
	assert.Equal(t, uint32(0), fi.Sys().(*syscall.Stat_t).Uid, "owned by root")
	_, err = os.Stat(filepath.Join(root, "etc/chef/validation.pem"))
	assert.True(t, os.IsNotExist(err), "the validator is gone once registered")
	assert.Contains(t, readFile(t, filepath.Join(root, "etc/chef/client.rb")), "ssl_verify_mode                  :verify_peer\n")

	testenv.Eventually(t, 20*time.Second, func() bool { st, err := ReadState(root); return err == nil && st.Phase == PhaseDeregistered }, "deregistered at termination")
	cancel()
	require.NoError(t, <-done)

	catcher.mu.Lock()
	tokens := append([]string(nil), catcher.tokens...)
	catcher.mu.Unlock()
	require.NotEmpty(t, tokens)
	secrets := map[string]string{
		"a private key marker": "PRIVATE KEY",
		"the validator":        secret(t, readFile(t, g.ValidatorKey)),
		"the node's key":       secret(t, clientKey),
	}
	for i, tok := range tokens {
		secrets["IMDS token "+string(rune('A'+i))] = tok
	}
	entries := logs.All()
	require.Greater(t, len(entries), 20)
	for _, entry := range entries {
		line, err := json.Marshal(map[string]any{"msg": entry.Message, "fields": entry.ContextMap()})
		require.NoError(t, err)
		for what, s := range secrets {
			assert.NotContains(t, string(line), s, "a log line carries %s: %s", what, entry.Message)
		}
	}
	state := readFile(t, filepath.Join(root, "var/lib/bootagent/state.json"))
	for what, s := range secrets {
		assert.NotContains(t, state, s, "state.json carries %s", what)
	}
}
