package chef

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/internal/testenv"
)

func newRegistrar(t *testing.T, url string, clock backoff.Clock) *Registrar {
	return &Registrar{
		Server:  ServerOptions{URL: url, AuthProtocol: "1.3", SSLVerify: true},
		Log:     zaptest.NewLogger(t),
		Backoff: backoff.Policy{Initial: time.Second, Max: 30 * time.Second, Jitter: 0.5},
		Budget:  time.Hour,
		Clock:   clock,
	}
}

func registration(t *testing.T, g *testenv.Goiardi, name string) Registration {
	vkey, err := os.ReadFile(g.ValidatorKey)
	require.NoError(t, err)
	return Registration{
		NodeName:      name,
		ClientKeyPath: filepath.Join(t.TempDir(), "etc/chef/client.pem"),
		ValidatorName: g.ValidatorName,
		ValidatorKey:  vkey,
		Node: Node{
			Environment: "_default",
			RunList:     []string{"role[web]", "recipe[base]"},
			Attributes:  map[string]any{"app": map[string]any{"port": 8080}},
		},
	}
}

// assertRegistered checks the server's state: one client with our public
// key, and the node with our run list.
func assertRegistered(t *testing.T, g *testenv.Goiardi, reg Registration) {
	t.Helper()
	keyPEM, err := os.ReadFile(reg.ClientKeyPath)
	require.NoError(t, err)
	key, err := ParseKey(keyPEM)
	require.NoError(t, err)
	pub, err := PublicKeyPEM(key)
	require.NoError(t, err)
	assert.True(t, samePublicKey(pub, g.ClientPublicKey(t, reg.NodeName)), "the server holds the instance's public key")
	fi, err := os.Stat(reg.ClientKeyPath)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "client.pem mode")
	n := g.Node(t, reg.NodeName)
	assert.Equal(t, reg.Node.RunList, n.RunList)
	assert.Equal(t, map[string]any{"port": float64(8080)}, n.NormalAttributes["app"])
}

func TestRegisterCreatesClientAndNode(t *testing.T) {
	for _, proto := range []string{"1.3", "1.0"} {
		t.Run("auth protocol "+proto, func(t *testing.T) {
			g := testenv.StartGoiardi(t)
			r := newRegistrar(t, g.URL, testenv.NewInstantClock())
			r.Server.AuthProtocol = proto
			reg := registration(t, g, "web01.example.internal")

			got, err := r.Register(context.Background(), reg)
			require.NoError(t, err)
			assert.Equal(t, Registered{ClientCreated: true, NodeCreated: true}, got)
			assertRegistered(t, g, reg)
			assert.Equal(t, []string{"web01.example.internal"}, nodeClients(t, g))
		})
	}
}

func TestRegisterAgainChangesNothingButTheRunList(t *testing.T) {
	g := testenv.StartGoiardi(t)
	r := newRegistrar(t, g.URL, testenv.NewInstantClock())
	reg := registration(t, g, "web01")
	_, err := r.Register(context.Background(), reg)
	require.NoError(t, err)

	reg.Node.RunList = []string{"role[db]"}
	got, err := r.Register(context.Background(), reg)
	require.NoError(t, err)
	assert.Equal(t, Registered{KeyReused: true}, got)
	assertRegistered(t, g, reg)
}

func TestRegisterFinishesAnInterruptedRegistration(t *testing.T) {
	t.Run("crash after the key was written, before the client was created", func(t *testing.T) {
		g := testenv.StartGoiardi(t)
		reg := registration(t, g, "web01")
		_, _, err := ensureKey("/", reg.ClientKeyPath, GenerateKey)
		require.NoError(t, err)

		got, err := newRegistrar(t, g.URL, testenv.NewInstantClock()).Register(context.Background(), reg)
		require.NoError(t, err)
		assert.Equal(t, Registered{KeyReused: true, ClientCreated: true, NodeCreated: true}, got)
		assertRegistered(t, g, reg)
	})
	t.Run("crash after the client was created, before the node was", func(t *testing.T) {
		g := testenv.StartGoiardi(t)
		reg := registration(t, g, "web01")
		keyPEM, _, err := ensureKey("/", reg.ClientKeyPath, GenerateKey)
		require.NoError(t, err)
		key, err := ParseKey(keyPEM)
		require.NoError(t, err)
		pub, err := PublicKeyPEM(key)
		require.NoError(t, err)
		v, err := newAPI(ServerOptions{URL: g.URL, AuthProtocol: "1.3"}, reg.ValidatorName, reg.ValidatorKey)
		require.NoError(t, err)
		require.NoError(t, v.do(context.Background(), http.MethodPost, "clients", map[string]string{"name": "web01", "public_key": pub}, nil))

		got, err := newRegistrar(t, g.URL, testenv.NewInstantClock()).Register(context.Background(), reg)
		require.NoError(t, err)
		assert.Equal(t, Registered{KeyReused: true, NodeCreated: true}, got)
		assertRegistered(t, g, reg)
		assert.Equal(t, []string{"web01"}, nodeClients(t, g), "no duplicate client")
	})
}

func TestRegisterRefusesANameOwnedByAnotherKey(t *testing.T) {
	g := testenv.StartGoiardi(t)
	other := registration(t, g, "web01")
	_, err := newRegistrar(t, g.URL, testenv.NewInstantClock()).Register(context.Background(), other)
	require.NoError(t, err)

	ours := registration(t, g, "web01")
	_, err = newRegistrar(t, g.URL, testenv.NewInstantClock()).Register(context.Background(), ours)
	require.ErrorIs(t, err, ErrNameTaken)
	assert.Contains(t, err.Error(), `a client named "web01" already exists on the Chef server with another key`)
	assert.Contains(t, err.Error(), `chef.node_name: "{hostname}-{instance_id}"`)
	assert.True(t, samePublicKey(g.ClientPublicKey(t, "web01"), mustPublic(t, other.ClientKeyPath)), "the other instance's client is untouched")
}

// nodeClients lists the clients on the server besides goiardi's own.
func nodeClients(t *testing.T, g *testenv.Goiardi) []string {
	var names []string
	for name := range g.Clients(t) {
		if name != "chef-validator" && name != "chef-webui" {
			names = append(names, name)
		}
	}
	return names
}

func mustPublic(t *testing.T, path string) string {
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	k, err := ParseKey(data)
	require.NoError(t, err)
	pub, err := PublicKeyPEM(k)
	require.NoError(t, err)
	return pub
}

// countingProxy forwards to a server and counts requests by method and path.
type countingProxy struct {
	posts atomic.Int32
	all   atomic.Int32
}

func (p *countingProxy) handler(t *testing.T, target string) http.Handler {
	u, err := url.Parse(target)
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(u)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.all.Add(1)
		if r.Method == http.MethodPost && r.URL.Path == "/clients" {
			p.posts.Add(1)
		}
		rp.ServeHTTP(w, r)
	})
}

func TestRegisterWithAWrongValidatorFailsOnceAndClearly(t *testing.T) {
	g := testenv.StartGoiardi(t)
	p := &countingProxy{}
	srv := httptest.NewServer(p.handler(t, g.URL))
	t.Cleanup(srv.Close)
	reg := registration(t, g, "web01")
	reg.ValidatorKey, _ = GenerateKey()

	_, err := newRegistrar(t, srv.URL, testenv.NewInstantClock()).Register(context.Background(), reg)
	require.ErrorIs(t, err, ErrValidatorRefused)
	assert.Contains(t, err.Error(), `the Chef server refused validator "chef-validator"`)
	assert.Contains(t, err.Error(), "HTTP 401")
	assert.Equal(t, int32(1), p.posts.Load(), "no retry storm on a wrong key")
}

func TestRegisterWaitsForAServerThatIsDownAtFirst(t *testing.T) {
	g := testenv.StartGoiardi(t)
	port := testenv.FreePort(t)
	p := &countingProxy{}
	clock := testenv.NewInstantClock()
	clock.OnWait = func(n int, _ time.Duration) {
		if n == 3 { // The server comes up after three failed attempts.
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			require.NoError(t, err)
			srv := &http.Server{Handler: p.handler(t, g.URL), ReadHeaderTimeout: time.Second}
			go func() { _ = srv.Serve(l) }()
			t.Cleanup(func() { _ = srv.Close() })
		}
	}
	reg := registration(t, g, "web01")
	got, err := newRegistrar(t, fmt.Sprintf("http://127.0.0.1:%d", port), clock).Register(context.Background(), reg)
	require.NoError(t, err)
	assert.Equal(t, 3, got.Retries)
	waits := clock.Waits()
	require.Len(t, waits, 3)
	assert.Less(t, waits[0], waits[2], "the delays grow: %v", waits)
	assertRegistered(t, g, reg)
}

func TestRegisterHonoursRetryAfter(t *testing.T) {
	g := testenv.StartGoiardi(t)
	var throttled atomic.Int32
	u, err := url.Parse(g.URL)
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if throttled.Add(1) <= 2 {
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprint(w, `{"error": ["solver busy"]}`)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	clock := testenv.NewInstantClock()
	reg := registration(t, g, "web01")

	_, err = newRegistrar(t, srv.URL, clock).Register(context.Background(), reg)
	require.NoError(t, err)
	waits := clock.Waits()
	require.Len(t, waits, 2)
	for _, w := range waits {
		assert.GreaterOrEqual(t, w, 7*time.Second, "the server's Retry-After, not the shorter backoff")
		assert.LessOrEqual(t, w, 7*time.Second+7*time.Second/2, "spread past it by at most the jitter")
	}
	assertRegistered(t, g, reg)
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC)
	assert.Equal(t, 30*time.Second, parseRetryAfter("30", now))
	assert.Equal(t, 90*time.Second, parseRetryAfter(now.Add(90*time.Second).Format(http.TimeFormat), now))
	assert.Zero(t, parseRetryAfter("soon", now))
	assert.Zero(t, parseRetryAfter("-5", now))
}

func TestRegisterOverTLS(t *testing.T) {
	g, ca := testenv.StartGoiardiTLS(t)
	t.Run("with the server's CA in trusted_certs", func(t *testing.T) {
		r := newRegistrar(t, g.URL, testenv.NewInstantClock())
		r.Server.CAFile = ca
		reg := registration(t, g, "tls01")
		_, err := r.Register(context.Background(), reg)
		require.NoError(t, err)
		assertRegistered(t, g, reg)
	})
	t.Run("without it: a clear error, and no retries", func(t *testing.T) {
		clock := testenv.NewInstantClock()
		r := newRegistrar(t, g.URL, clock)
		_, err := r.Register(context.Background(), registration(t, g, "tls02"))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "the Chef server's certificate is not trusted")
		assert.Contains(t, err.Error(), "chef.trusted_certs")
		assert.Empty(t, clock.Waits(), "a certificate does not change by asking again")
	})
	t.Run("with another CA: the same", func(t *testing.T) {
		_, otherCA := testenv.StartGoiardiTLS(t)
		r := newRegistrar(t, g.URL, testenv.NewInstantClock())
		r.Server.CAFile = otherCA
		_, err := r.Register(context.Background(), registration(t, g, "tls03"))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "certificate signed by unknown authority")
	})
}
