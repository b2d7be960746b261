package chef

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/internal/testenv"
)

// faultProxy stands in front of goiardi and answers one method and path
// itself, the way a broken or hostile server (or something between the
// agent and it) would.
func faultProxy(t *testing.T, g *testenv.Goiardi, methodPath string, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	u, err := url.Parse(g.URL)
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method+" "+r.URL.Path == methodPath {
			h(w, r)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestAnAnswerOverTheLimitIsRefusedUnread(t *testing.T) {
	g := testenv.StartGoiardi(t)
	var written atomic.Int64
	srv := faultProxy(t, g, "POST /clients", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		chunk := []byte(strings.Repeat("a", 64<<10))
		fmt.Fprint(w, `{"uri": "`)
		for range 100 << 20 / len(chunk) { // 100 MiB, as a hostile server would send
			n, err := w.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
		fmt.Fprint(w, `"}`)
	})

	_, err := newRegistrar(t, srv.URL, testenv.NewInstantClock()).Register(context.Background(), registration(t, g, "web01"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "POST "+srv.URL+"/clients: HTTP 201: the answer is larger than 4 MiB")
	assert.Less(t, written.Load(), int64(16<<20), "the agent stopped reading at the limit (plus what the sockets buffer)")
}

func TestARedirectIsRefusedAndNothingIsResent(t *testing.T) {
	g := testenv.StartGoiardi(t)
	var sunk atomic.Int32
	sink := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sunk.Add(1)
		t.Errorf("the sink received %s %s with headers %v", r.Method, r.URL, r.Header)
	}))
	t.Cleanup(sink.Close)
	srv := faultProxy(t, g, "POST /clients", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, sink.URL+"/collect", http.StatusTemporaryRedirect)
	})

	_, err := newRegistrar(t, srv.URL, testenv.NewInstantClock()).Register(context.Background(), registration(t, g, "web01"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "POST "+srv.URL+"/clients: HTTP 307: the server redirected to "+sink.URL+"/collect")
	assert.Zero(t, sunk.Load(), "nothing was sent where the server pointed")
}

func TestASuccessWhoseAnswerIsNotJSONIsAnError(t *testing.T) {
	g := testenv.StartGoiardi(t)
	srv := faultProxy(t, g, "POST /clients", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusCreated)
		fmt.Fprint(w, "<html>created, probably</html>")
	})

	_, err := newRegistrar(t, srv.URL, testenv.NewInstantClock()).Register(context.Background(), registration(t, g, "web01"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "POST "+srv.URL+"/clients: HTTP 201: the answer is not JSON")
	assert.Contains(t, err.Error(), "<html>created, probably</html>")
	assert.NotContains(t, err.Error(), "401")
}

func TestAFailureNamesTheURLTheStatusAndTheBodyButNoKey(t *testing.T) {
	g := testenv.StartGoiardi(t)
	key, err := GenerateKey()
	require.NoError(t, err)
	srv := faultProxy(t, g, "POST /clients", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusBadGateway)
		fmt.Fprintf(w, "<html>upstream down</html>\n%s%s", key, strings.Repeat("x", 4096))
	})
	r := newRegistrar(t, srv.URL, testenv.NewInstantClock())
	r.Backoff.Initial = time.Hour // one attempt: the first wait would pass the budget
	r.Budget = time.Minute

	_, err = r.Register(context.Background(), registration(t, g, "web01"))
	require.Error(t, err)
	msg := err.Error()
	assert.Contains(t, msg, "POST "+srv.URL+"/clients: HTTP 502: <html>upstream down</html>")
	assert.NotContains(t, msg, "PRIVATE KEY")
	assert.NotContains(t, msg, strings.Split(string(key), "\n")[1], "not a line of the key")
	assert.Less(t, len(msg), 1000, "an excerpt, not the whole body: %s", msg)
}

// cannedAnswer answers every request with one status and body, without a
// network: the fuzzer reaches the decoding as fast as it can.
type cannedAnswer struct {
	status int
	body   []byte
}

func (c cannedAnswer) RoundTrip(req *http.Request) (*http.Response, error) {
	return &http.Response{StatusCode: c.status, Header: http.Header{"Location": {"http://elsewhere.example/x"}},
		Body: io.NopCloser(bytes.NewReader(c.body)), Request: req}, nil
}

func FuzzServerAnswers(f *testing.F) {
	key, err := GenerateKey()
	require.NoError(f, err)
	for _, seed := range []struct {
		status int
		body   string
	}{
		{201, `{"uri": "https://chef.example.com/clients/web01"}`},
		{201, `{"uri": ""}`},
		{201, `<html>created</html>`},
		{200, ``},
		{200, `{"public_key": 7}`},
		{500, `{"error": ["solver busy"]}`},
		{502, "<html>upstream down</html>\n" + string(key)},
		{401, `{"error": "Failed to authenticate"}`},
		{307, ``},
		{409, `{"error": ["Client already exists"]}` + strings.Repeat(" ", 300)},
	} {
		f.Add(seed.status, []byte(seed.body))
	}
	keyLine := strings.Split(string(key), "\n")[1]
	a, err := newAPI(ServerOptions{URL: "https://chef.example.com/organizations/acme", AuthProtocol: "1.3"}, "web01", key)
	require.NoError(f, err)
	f.Fuzz(func(t *testing.T, status int, body []byte) {
		if status < 100 || status > 999 {
			return
		}
		a.http.Transport = cannedAnswer{status, body}
		var created struct {
			URI string `json:"uri"`
		}
		_, err = a.doHeader(context.Background(), http.MethodPost, "clients", map[string]string{"name": "web01"}, &created)
		if err == nil {
			require.True(t, status >= 200 && status < 300, "only a 2xx succeeds, not %d", status)
			require.True(t, json.Valid(body), "a success answered JSON")
			return
		}
		var e *APIError
		require.ErrorAs(t, err, &e)
		require.Equal(t, status, e.Status)
		msg := err.Error()
		require.True(t, utf8.ValidString(msg), "the error is text")
		require.NotContains(t, msg, "\n", "the error is one line")
		require.Less(t, len(msg), 1200, "an excerpt, not the answer")
		if !strings.Contains(string(body), keyLine[:20]) {
			return
		}
		require.NotContains(t, msg, keyLine[:20], "a key the server echoed is not quoted")
	})
}

func TestTheKeysAreReadInsideTheRoot(t *testing.T) {
	g := testenv.StartGoiardi(t)
	root := t.TempDir()
	reg := registration(t, g, "web01")
	reg.ClientKeyPath = "/etc/chef/client.pem"
	// client.pem is a link whose absolute target is taken inside the root;
	// the same path outside it holds a key the server never saw.
	outside := filepath.Join(t.TempDir(), "machine-key.pem")
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/chef"), 0o755))
	require.NoError(t, os.Symlink(outside, filepath.Join(root, "etc/chef/client.pem")))
	stranger, err := GenerateKey()
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(outside, stranger, 0o600))
	r := newRegistrar(t, g.URL, testenv.NewInstantClock())
	r.Server.Root = root
	_, err = r.Register(context.Background(), reg)
	require.NoError(t, err)
	assert.FileExists(t, filepath.Join(root, outside), "the key was written inside the root")

	p, err := r.ProbeServer(context.Background(), "web01", reg.ClientKeyPath)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, p.KeyStatus, "the probe signs with the key inside the root")
	out, err := r.Deregister(context.Background(), Leaving{Name: "web01", KeyPath: reg.ClientKeyPath, Confirmed: true})
	require.NoError(t, err, "the deletions are signed with the key the registration made")
	assert.True(t, out.NodeDeleted && out.ClientDeleted)
	assert.Empty(t, g.Clients(t)["web01"])
}

func TestTheRequestsOfARegistrationShareOneBudget(t *testing.T) {
	g := testenv.StartGoiardi(t)
	u, err := url.Parse(g.URL)
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(u)
	var clientPosts atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Method + " " + r.URL.Path {
		case "POST /clients":
			if clientPosts.Add(1) <= 5 { // the client is made after five refusals
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
		case "POST /nodes":
			w.WriteHeader(http.StatusServiceUnavailable) // the node never is
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	clock := testenv.NewInstantClock()
	r := newRegistrar(t, srv.URL, clock)
	r.Budget = time.Minute

	_, err = r.Register(context.Background(), registration(t, g, "web01"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "POST "+srv.URL+"/nodes: HTTP 503")
	assert.Contains(t, err.Error(), "(gave up within chef.request_budget, 1m0s)")
	var waited time.Duration
	for _, w := range clock.Waits() {
		waited += w
	}
	assert.LessOrEqual(t, waited, time.Minute-5*time.Second, "the client's retries and the node's together stay in the budget, and the last attempt has time")
}

func TestAnExcerptIsOneLineOfPlainTextWithoutKeys(t *testing.T) {
	key, err := GenerateKey()
	require.NoError(t, err)
	line := strings.Split(string(key), "\n")[1]
	for name, body := range map[string]string{
		"terminal escapes":  "\x1b[2K\x1b[32mregistered OK\x1b[0m\x1b]0;owned\a",
		"lower-case armour": strings.ToLower("-----BEGIN RSA PRIVATE KEY-----\n") + line + "\n",
		"four dashes":       "----BEGIN PRIVATE KEY----\n" + line + "\n----END PRIVATE KEY----",
		"a bare key body":   "oops: " + line,
		"CRLF armour":       strings.ReplaceAll(string(key), "\n", "\r\n"),
	} {
		t.Run(name, func(t *testing.T) {
			got := excerpt([]byte(body))
			assert.NotContains(t, got, "\x1b")
			assert.NotContains(t, got, "\a")
			assert.NotContains(t, got, line[:20])
			for _, r := range got {
				assert.True(t, unicode.IsPrint(r), "%q is printable", r)
			}
		})
	}
	assert.Equal(t, `\x1b[32mOK\x1b[0m`, excerpt([]byte("\x1b[32mOK\x1b[0m")), "escapes are shown, not acted on")
	sha := strings.Repeat("0123456789abcdef", 4)
	assert.Equal(t, "checksum "+sha, excerpt([]byte("checksum "+sha)), "a hex digest is no key")
}

func TestARedirectsLocationIsQuotedShortAndWithoutItsPassword(t *testing.T) {
	key, err := GenerateKey()
	require.NoError(t, err)
	a, err := newAPI(ServerOptions{URL: "https://chef.example.com/organizations/acme", AuthProtocol: "1.3"}, "web01", key)
	require.NoError(t, err)
	for _, loc := range []string{"https://admin:hunter2@evil.example/" + strings.Repeat("a", 1<<20), "https://admin:hunter2@evil.example/\x01"} {
		a.http.Transport = redirectTo(loc)
		err = a.do(context.Background(), http.MethodPost, "clients", map[string]string{"name": "web01"}, nil)
		require.Error(t, err)
		assert.Less(t, len(err.Error()), 1000)
		assert.NotContains(t, err.Error(), "hunter2")
	}
}

type redirectTo string

func (l redirectTo) RoundTrip(req *http.Request) (*http.Response, error) {
	return &http.Response{StatusCode: http.StatusFound, Header: http.Header{"Location": {string(l)}}, Body: http.NoBody, Request: req}, nil
}

func TestAnErrorWithAHugeBodyKeepsItsStatus(t *testing.T) {
	key, err := GenerateKey()
	require.NoError(t, err)
	a, err := newAPI(ServerOptions{URL: "https://chef.example.com", AuthProtocol: "1.3"}, "web01", key)
	require.NoError(t, err)
	a.http.Transport = cannedAnswer{http.StatusServiceUnavailable, []byte("<html>busy" + strings.Repeat(" ", 8<<20) + "</html>")}
	err = a.do(context.Background(), http.MethodGet, "nodes/web01", nil, nil)
	var e *APIError
	require.ErrorAs(t, err, &e)
	assert.Equal(t, http.StatusServiceUnavailable, e.Status)
	assert.True(t, e.Retryable(), "a 503 is worth asking again, whatever its page")
	assert.Contains(t, err.Error(), "HTTP 503: <html>busy")
}

func TestANodeAnswerForAnotherNodeIsRefused(t *testing.T) {
	g := testenv.StartGoiardi(t)
	reg := registration(t, g, "web01")
	_, err := newRegistrar(t, g.URL, testenv.NewInstantClock()).Register(context.Background(), reg)
	require.NoError(t, err)
	srv := faultProxy(t, g, "GET /nodes/web01", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"name": "db01", "json_class": "Chef::Node", "chef_type": "node", "normal": {"secret": "of db01"}}`)
	})
	reg.ValidatorKey = nil

	_, err = newRegistrar(t, srv.URL, testenv.NewInstantClock()).Register(context.Background(), reg)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "GET "+srv.URL+"/nodes/web01: HTTP 200: the answer is node \"db01\", not \"web01\"")
	assert.NotContains(t, fmt.Sprint(g.Node(t, "web01").NormalAttributes), "of db01", "nothing of another node is saved")
}

func TestParseRetryAfterCannotOverflow(t *testing.T) {
	now := time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC)
	assert.Equal(t, backoff.MaxRetryAfter, parseRetryAfter("9223372036854775807", now))
	assert.Equal(t, backoff.MaxRetryAfter, parseRetryAfter("9300000000", now))
}
