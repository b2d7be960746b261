package chef

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
