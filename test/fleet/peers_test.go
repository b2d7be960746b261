package fleet

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

// crashAt puts a front before a peer that kills the peer when the n-th
// request reaches it, as a crash under the storm does (the IMDS emulator's
// "concurrent map read and map write"); that request and every one after
// find nobody.
func crashAt(t *testing.T, target string, n int, kill func()) string {
	t.Helper()
	u, err := url.Parse(target)
	require.NoError(t, err)
	p := httputil.NewSingleHostReverseProxy(u)
	p.ErrorLog = log.New(io.Discard, "", 0)
	var seen atomic.Int64
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if seen.Add(1) == int64(n) {
			kill()
		}
		p.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	return front.URL
}

// TestAStormStopsWhenAPeerDies kills a peer in the middle of a small storm
// and checks that the harness says so at once, with how far the agents
// got, instead of waiting for agents that can never converge.
func TestAStormStopsWhenAPeerDies(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	require.NoError(t, syscall.Sethostname([]byte("localhost")))
	defer func(n int) { *fleetSize = n }(*fleetSize)
	// Each agent needs more than one request of each peer to converge,
	// so a peer gone at the fourth leaves some agents behind for good.
	*fleetSize = 3
	const crashRequest = 4
	// What the storm may take if the death goes unnoticed: far more
	// than noticing takes, far less than the test binary's -timeout.
	const within = 2 * time.Minute

	for _, tc := range []struct {
		name, peer string
		front      func(emu *testenv.IMDS, g *testenv.Goiardi) peers
	}{
		{
			name: "the IMDS emulator crashes", peer: "the IMDS emulator died",
			front: func(emu *testenv.IMDS, g *testenv.Goiardi) peers {
				// The token front keeps the emulator from crashing on
				// its own first (its token map race), before the kill.
				return peers{imds: emu, imdsURL: crashAt(t, serialiseTokens(t, emu.URL), crashRequest, emu.Kill), chef: g, chefURL: g.URL}
			},
		},
		{
			name: "goiardi crashes", peer: "goiardi died",
			front: func(emu *testenv.IMDS, g *testenv.Goiardi) peers {
				return peers{imds: emu, imdsURL: serialiseTokens(t, emu.URL), chef: g, chefURL: crashAt(t, g.URL, crashRequest, g.Kill)}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte(userData)})
			g := testenv.StartGoiardi(t)
			began := time.Now()
			_, err := runStorm(t, tc.front(emu, g), storm{name: tc.name, backoff: &noBackoff}, within)
			require.Error(t, err, "a storm whose peer died cannot converge")
			t.Logf("the harness said, after %s:\n%v", time.Since(began).Round(time.Millisecond), err)
			assert.Less(t, time.Since(began), within, "the harness noticed the death, not its own deadline")
			assert.Contains(t, err.Error(), tc.peer)
			assert.Contains(t, err.Error(), "exited: signal: killed", "the diagnosis says how the peer ended")
			assert.Regexp(t, `agent-000\d: \w+: `, err.Error(), "the diagnosis shows the agents behind")
		})
	}
}

// TestTheTokenFrontLetsATokenRequestThroughAlone holds a read at the
// emulator and asks for a token behind it: the token request must wait
// for the read to end, since the emulator's token map has no lock.
func TestTheTokenFrontLetsATokenRequestThroughAlone(t *testing.T) {
	e := newHoldingEmulator(t)
	f := newTokenFront(t, e.URL)
	front := httptest.NewServer(f)
	defer front.Close()

	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { _ = imdsGet(http.DefaultClient, front.URL, "token") })
	<-e.readIn
	wg.Go(func() { _, _ = imdsToken(http.DefaultClient, front.URL) })
	tokenRequestArrives(t, f, e.putIn)
	e.release()
	<-e.putIn
	assert.False(t, e.overlapped.Load(), "the token request reached the emulator while a read was going")
}

// holdingEmulator stands in for the emulator: it holds the first read
// until releaseRead closes, as a slow answer would, and records whether a
// token request came in while it did.
type holdingEmulator struct {
	*httptest.Server
	readIn, releaseRead, putIn chan struct{}
	reading, overlapped        atomic.Bool
	releaseOnce                sync.Once
}

// release lets the read held go on.
func (e *holdingEmulator) release() { e.releaseOnce.Do(func() { close(e.releaseRead) }) }

func newHoldingEmulator(t *testing.T) *holdingEmulator {
	e := &holdingEmulator{readIn: make(chan struct{}), releaseRead: make(chan struct{}), putIn: make(chan struct{}, 1)}
	e.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			e.overlapped.Store(e.reading.Load())
			e.putIn <- struct{}{}
			return
		}
		e.reading.Store(true)
		close(e.readIn)
		<-e.releaseRead // it serves on, whoever left
		e.reading.Store(false)
	}))
	t.Cleanup(e.Close)
	t.Cleanup(e.release) // first: Close waits for the read it holds
	return e
}

// tokenRequestArrives waits for the token request sent last to reach the
// emulator beside the read going, or to wait at the front (then no new read
// gets in).
func tokenRequestArrives(t *testing.T, f *tokenFront, putIn <-chan struct{}) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, func() bool {
		if len(putIn) > 0 {
			return true
		}
		if f.mu.TryRLock() {
			f.mu.RUnlock()
			return false
		}
		return true
	}, "the token request neither reached the emulator nor waited at the front")
}

func imdsToken(c *http.Client, base string) (string, error) {
	req, err := http.NewRequest(http.MethodPut, base+"/latest/api/token", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
	res, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err == nil && res.StatusCode != http.StatusOK {
		err = fmt.Errorf("PUT /latest/api/token: %s", res.Status)
	}
	return string(body), err
}

func imdsGet(c *http.Client, base, token string) error {
	req, err := http.NewRequest(http.MethodGet, base+"/latest/meta-data/instance-id", nil)
	if err != nil {
		return err
	}
	req.Header.Set("X-aws-ec2-metadata-token", token)
	res, err := c.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	_, err = io.Copy(io.Discard, res.Body)
	if err == nil && res.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET /latest/meta-data/instance-id: %s", res.Status)
	}
	return err
}

// TestTheTokenFrontHoldsAReadItsAgentGaveUpOn: an agent that gives up on a
// read (its half-second timeout, under load) leaves the emulator still
// serving it, and the token map still being read; a token request must
// wait for the emulator, not for the agent.
func TestTheTokenFrontHoldsAReadItsAgentGaveUpOn(t *testing.T) {
	e := newHoldingEmulator(t)
	f := newTokenFront(t, e.URL)
	front := httptest.NewServer(f)
	defer front.Close()

	ctx, giveUp := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, front.URL+"/latest/user-data", nil)
	require.NoError(t, err)
	gaveUp := make(chan struct{})
	go func() {
		defer close(gaveUp)
		if res, err := http.DefaultClient.Do(req); err == nil {
			res.Body.Close()
		}
	}()
	<-e.readIn
	giveUp()
	<-gaveUp

	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { _, _ = imdsToken(http.DefaultClient, front.URL) })
	tokenRequestArrives(t, f, e.putIn)
	e.release()
	<-e.putIn
	assert.False(t, e.overlapped.Load(), "the token request reached the emulator while it still served a read its agent gave up on")
}
