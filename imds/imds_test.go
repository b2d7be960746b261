package imds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/internal/testenv"
)

func newClient(t *testing.T, endpoint string, mod ...func(*Options)) *Client {
	t.Helper()
	o := Options{Endpoint: endpoint, TokenTTL: time.Hour, Clock: testenv.NewInstantClock(), Log: zaptest.NewLogger(t)}
	for _, m := range mod {
		m(&o)
	}
	return New(o)
}

func TestReadsFromTheEmulator(t *testing.T) {
	m := testenv.StartIMDS(t, testenv.IMDSConfig{
		InstanceID:    "i-0abc1234def567890",
		Region:        "eu-central-1",
		LocalHostname: "ip-10-1-2-3.eu-central-1.compute.internal",
		UserData:      []byte("hostname=web01\n"),
		Tags:          map[string]string{"Name": "web-from-tag"},
	})
	c := newClient(t, m.URL)
	ctx := context.Background()

	id, _, err := c.Wait(ctx, 0)
	require.NoError(t, err)
	assert.Equal(t, "i-0abc1234def567890", id.InstanceID)
	assert.Equal(t, "eu-central-1", id.Region)
	assert.Equal(t, "eu-central-1a", id.AvailabilityZone)
	assert.Equal(t, "123456789012", id.AccountID)

	ud, err := c.UserData(ctx)
	require.NoError(t, err)
	assert.Equal(t, "hostname=web01\n", string(ud))

	local, err := c.LocalHostname(ctx)
	require.NoError(t, err)
	assert.Equal(t, "ip-10-1-2-3.eu-central-1.compute.internal", local)

	tag, err := c.Tag(ctx, "Name")
	require.NoError(t, err)
	assert.Equal(t, "web-from-tag", tag)

	_, err = c.Tag(ctx, "Role")
	require.ErrorIs(t, err, ErrNotFound)
	assert.Contains(t, err.Error(), "--instance-metadata-tags enabled")
}

func TestNoUserDataIsNotAnError(t *testing.T) {
	m := testenv.StartIMDS(t, testenv.IMDSConfig{})
	ud, err := newClient(t, m.URL).UserData(context.Background())
	require.NoError(t, err)
	assert.Nil(t, ud, "IMDS answers 404 for an instance without user-data")
}

func TestTheEndpointComesFromTheEnvironmentWhenNotConfigured(t *testing.T) {
	m := testenv.StartIMDS(t, testenv.IMDSConfig{InstanceID: "i-0feedbeef0000000a"})
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", m.URL)
	id, err := newClient(t, "").Identity(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "i-0feedbeef0000000a", id.InstanceID)
}

// countingProxy forwards to target and counts what passes.
type countingProxy struct {
	tokenPUTs atomic.Int32
	gets      atomic.Int32
	tokenless atomic.Int32
	lastTTL   atomic.Value
}

func (p *countingProxy) start(t *testing.T, target string) string {
	u, err := url.Parse(target)
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			p.tokenPUTs.Add(1)
			p.lastTTL.Store(r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds"))
		case r.Header.Get("X-Aws-Ec2-Metadata-Token") == "":
			p.tokenless.Add(1)
		default:
			p.gets.Add(1)
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func TestOneTokenServesEveryRequest(t *testing.T) {
	m := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=a\n")})
	p := &countingProxy{}
	c := newClient(t, p.start(t, m.URL), func(o *Options) { o.TokenTTL = 6 * time.Hour })
	ctx := context.Background()

	_, _, err := c.Wait(ctx, 0)
	require.NoError(t, err)
	for range 10 {
		_, err = c.UserData(ctx)
		require.NoError(t, err)
		_, err = c.LocalHostname(ctx)
		require.NoError(t, err)
	}
	assert.Equal(t, int32(1), p.tokenPUTs.Load(), "token requests")
	assert.Equal(t, int32(21), p.gets.Load(), "GETs with the token")
	assert.Equal(t, int32(0), p.tokenless.Load(), "IMDSv1 requests")
	assert.Equal(t, "21600", p.lastTTL.Load(), "the token's requested life in seconds")
}

// fakeIMDS is an IMDS for the faults the emulator cannot produce. Each
// handler may be replaced; by default it serves a token and a document.
type fakeIMDS struct {
	token     func(w http.ResponseWriter, r *http.Request)
	identity  func(w http.ResponseWriter, r *http.Request)
	userData  func(w http.ResponseWriter, r *http.Request)
	tokenless atomic.Int32
	requests  atomic.Int32
}

const identityDoc = `{"instanceId":"i-0123456789abcdef0","region":"eu-west-1","availabilityZone":"eu-west-1a","accountId":"123456789012"}`

func (f *fakeIMDS) start(t *testing.T) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.requests.Add(1)
		if r.URL.Path == "/latest/api/token" {
			if f.token != nil {
				f.token(w, r)
				return
			}
			w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds"))
			fmt.Fprint(w, "TOKEN")
			return
		}
		if r.Header.Get("X-Aws-Ec2-Metadata-Token") == "" {
			f.tokenless.Add(1)
		}
		switch {
		case r.URL.Path == "/latest/dynamic/instance-identity/document" && f.identity != nil:
			f.identity(w, r)
		case r.URL.Path == "/latest/dynamic/instance-identity/document":
			fmt.Fprint(w, identityDoc)
		case r.URL.Path == "/latest/user-data" && f.userData != nil:
			f.userData(w, r)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// failing answers with each status in turn, then with ok.
func failing(ok func(http.ResponseWriter, *http.Request), statuses ...int) func(http.ResponseWriter, *http.Request) {
	var n atomic.Int32
	return func(w http.ResponseWriter, r *http.Request) {
		i := int(n.Add(1)) - 1
		if i < len(statuses) {
			w.WriteHeader(statuses[i])
			return
		}
		ok(w, r)
	}
}

func observed(t *testing.T) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.DebugLevel)
	return zap.New(zapcore.NewTee(core, zaptest.NewLogger(t).Core())), logs
}

func TestWaitRidesOutErrorBurstsAndLogsOncePerReason(t *testing.T) {
	serveDoc := func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, identityDoc) }
	f := &fakeIMDS{identity: failing(serveDoc, 503, 503, 503, 500, 500, 429, 429, 429)}
	log, logs := observed(t)
	clock := testenv.NewInstantClock()
	c := newClient(t, f.start(t), func(o *Options) { o.Log = log; o.Clock = clock })

	id, stats, err := c.Wait(context.Background(), 0)
	require.NoError(t, err)
	assert.Equal(t, "i-0123456789abcdef0", id.InstanceID)
	assert.Equal(t, 9, stats.Attempts)
	assert.Equal(t, []string{"HTTP 503", "HTTP 500", "HTTP 429"}, stats.Reasons)

	var reasons []string
	for _, e := range logs.FilterMessage("waiting for IMDS").All() {
		reasons = append(reasons, e.ContextMap()["reason"].(string))
	}
	assert.Equal(t, []string{"HTTP 503", "HTTP 500", "HTTP 429"}, reasons, "one line per change of reason")
	assert.Equal(t, 1, logs.FilterMessage("IMDS answers").Len())
	waits := clock.Waits()
	require.Len(t, waits, 8, "one backoff per failure")
	for i := 1; i < len(waits); i++ {
		assert.LessOrEqual(t, waits[i], 10*time.Second, "capped")
	}
}

func TestWaitOutlastsRefusedConnections(t *testing.T) {
	// Reserve a port on which nothing listens yet: IMDS is not up at boot.
	port := testenv.FreePort(t)
	endpoint := fmt.Sprintf("http://127.0.0.1:%d", port)
	clock := testenv.NewInstantClock()
	var started atomic.Bool
	clock.OnWait = func(n int, _ time.Duration) {
		if n == 4 {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			require.NoError(t, err)
			f := &fakeIMDS{}
			srv := httptest.NewUnstartedServer(nil)
			srv.Listener.Close()
			srv.Listener = l
			srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				started.Store(true)
				if r.Method == http.MethodPut {
					w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", "60")
					fmt.Fprint(w, "TOKEN")
					return
				}
				fmt.Fprint(w, identityDoc)
			})
			_ = f
			srv.Start()
			t.Cleanup(srv.Close)
		}
	}
	log, logs := observed(t)
	c := newClient(t, endpoint, func(o *Options) { o.Clock = clock; o.Log = log })

	id, _, err := c.Wait(context.Background(), 0)
	require.NoError(t, err)
	assert.Equal(t, "i-0123456789abcdef0", id.InstanceID)
	assert.True(t, started.Load())
	assert.Len(t, clock.Waits(), 4)
	require.Equal(t, 1, logs.FilterMessage("waiting for IMDS").Len(), "four refusals, one reason, one line")
	assert.Contains(t, logs.FilterMessage("waiting for IMDS").All()[0].ContextMap()["reason"], "connection refused")
}

func TestWaitGivesUpOnAStalledRequestAndAsksAgain(t *testing.T) {
	var gaveUp atomic.Bool
	var calls atomic.Int32
	f := &fakeIMDS{identity: func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			select {
			case <-r.Context().Done():
				gaveUp.Store(true)
			case <-time.After(10 * time.Second):
			}
			return
		}
		fmt.Fprint(w, identityDoc)
	}}
	c := newClient(t, f.start(t))
	_, _, err := c.Wait(context.Background(), 0)
	require.NoError(t, err)
	// The server learns that the client hung up a moment after it did.
	testenv.Eventually(t, 5*time.Second, gaveUp.Load, "the client abandoned the stalled request instead of waiting 10 s")
	assert.Equal(t, int32(2), calls.Load())
}

func TestTokenRefusals(t *testing.T) {
	tests := []struct {
		name      string
		token     func(http.ResponseWriter, *http.Request)
		allowV1   bool
		timeout   time.Duration
		wantErr   string
		wantV1    bool
		wantFatal bool
	}{
		{
			name:    "a 403 on the token ends the wait with the reason",
			token:   func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusForbidden) },
			wantErr: "IMDS refused a session token (403): the metadata service is disabled",
		},
		{
			name: "a hanging token request is the hop limit",
			token: func(_ http.ResponseWriter, r *http.Request) {
				select {
				case <-r.Context().Done():
				case <-time.After(10 * time.Second):
				}
			},
			timeout: 1500 * time.Millisecond,
			wantErr: "--http-put-response-hop-limit 2",
		},
		{
			name:    "a 403 falls back to IMDSv1 only when allowed",
			token:   func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusForbidden) },
			allowV1: true,
			wantV1:  true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeIMDS{token: tt.token}
			c := newClient(t, f.start(t), func(o *Options) {
				o.AllowIMDSv1 = tt.allowV1
				o.Clock = backoff.RealClock{}
				o.Backoff = backoff.Policy{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond}
			})
			_, _, err := c.Wait(context.Background(), tt.timeout)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
			} else {
				require.NoError(t, err)
			}
			if tt.wantV1 {
				assert.Positive(t, f.tokenless.Load(), "IMDSv1 requests")
			} else {
				assert.Zero(t, f.tokenless.Load(), "no IMDSv1 request unless allowed")
			}
		})
	}
}

func TestOversizedUserDataIsRefused(t *testing.T) {
	f := &fakeIMDS{userData: func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, strings.Repeat("a", 2<<20))
	}}
	_, err := newClient(t, f.start(t)).UserData(context.Background())
	require.ErrorIs(t, err, ErrTooLarge)
	assert.Equal(t, int32(2), f.requests.Load(), "one token and one attempt: size will not change on retry")
}

func TestAMalformedInstanceIDIsRefused(t *testing.T) {
	f := &fakeIMDS{identity: func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, `{"instanceId":"i-../../etc","region":"x"}`)
	}}
	_, _, err := newClient(t, f.start(t)).Wait(context.Background(), 0)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `instance ID "i-../../etc" is not of the form`)
}

func TestWaitEndsWithTheContext(t *testing.T) {
	f := &fakeIMDS{identity: func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(503) }}
	ctx, cancel := context.WithCancel(context.Background())
	clock := testenv.NewInstantClock()
	clock.OnWait = func(n int, _ time.Duration) {
		if n == 3 {
			cancel()
		}
	}
	c := newClient(t, f.start(t), func(o *Options) { o.Clock = clock })
	_, _, err := c.Wait(ctx, 0)
	require.True(t, errors.Is(err, context.Canceled), "got %v", err)
}

func TestOversizedUserDataSaysItsSize(t *testing.T) {
	f := &fakeIMDS{userData: func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(2<<20))
		fmt.Fprint(w, strings.Repeat("a", 2<<20))
	}}
	_, err := newClient(t, f.start(t)).UserData(context.Background())
	var tl *TooLargeError
	require.ErrorAs(t, err, &tl)
	assert.Equal(t, int64(2<<20), tl.Size)
	assert.Contains(t, err.Error(), "IMDS /latest/user-data: the answer is 2097152 bytes, more than the 1048576 bootagent reads")
}

func TestAnIdentityDocumentThatIsNotJSONIsNamedForWhatItIs(t *testing.T) {
	f := &fakeIMDS{identity: func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, "<html>captive portal</html>")
	}}
	_, _, err := newClient(t, f.start(t)).Wait(context.Background(), 0)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "IMDS /latest/dynamic/instance-identity/document: the answer is not an instance identity document (JSON)")
	assert.NotContains(t, err.Error(), "no answer")
	var e *Error
	require.ErrorAs(t, err, &e)
	assert.Equal(t, "malformed", e.Kind())
}

func TestAnOversizedAnswerThatBreaksOffIsAtLeastItsCount(t *testing.T) {
	f := &fakeIMDS{userData: func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, strings.Repeat("a", 3<<20))
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the connection breaks off mid-answer
	}}
	_, err := newClient(t, f.start(t)).UserData(context.Background())
	var tl *TooLargeError
	require.ErrorAs(t, err, &tl)
	assert.True(t, tl.AtLeast, "a size counted up to a break is a lower bound")
	assert.Contains(t, err.Error(), "the answer is more than")
}
