package fleet

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"time"
)

// bucket is the resolution of the proxy's request-rate counts.
const bucket = 100 * time.Millisecond

// retryAfter is what the proxy tells a refused request to wait.
const retryAfter = time.Second

// throttle stands in front of the Chef server as an overloaded one does: it
// lets through up to rate requests a second (a token bucket) and answers
// the rest with status and Retry-After. It also loses the answer to every
// loseEvery-th client creation it let through (the server created the
// client, the agent hears 503), as a storm does, so that the agents must
// recognise their own client on the 409 that follows.
type throttle struct {
	proxy     *httputil.ReverseProxy
	validator string
	rate      float64
	burst     float64
	status    int
	loseEvery int

	mu     sync.Mutex
	tokens float64
	last   time.Time
	start  time.Time
	// offered and forwarded count requests per bucket since start.
	offered, forwarded []int
	refused, lost      int
	conflicts          int
	postClients        int
	// waitUntil is when each requester (a client name) may come back after
	// a refusal; early counts those that came back sooner.
	waitUntil map[string]time.Time
	early     int
}

// burstFor is how many requests the proxy lets through at once after a
// quiet spell: a quarter second's worth.
func burstFor(rate float64) float64 { return max(1, rate/4) }

func newThrottle(target string, validator string, rate float64, status, loseEvery int) *throttle {
	u, err := url.Parse(target)
	if err != nil {
		panic(err)
	}
	p := httputil.NewSingleHostReverseProxy(u)
	p.Transport = &http.Transport{MaxIdleConnsPerHost: 256}
	return &throttle{
		proxy: p, validator: validator, rate: rate, burst: burstFor(rate), status: status, loseEvery: loseEvery,
		waitUntil: map[string]time.Time{},
	}
}

// requester names who sent r: the client that signed it, or for a
// validator's client creation, the client being created.
func (th *throttle) requester(r *http.Request, body []byte) string {
	who := r.Header.Get("X-Ops-Userid")
	if who == th.validator && r.Method == http.MethodPost {
		var c struct {
			Name string `json:"name"`
		}
		if json.Unmarshal(body, &c) == nil && c.Name != "" {
			return c.Name
		}
	}
	return who
}

// admit counts the request and decides whether it goes through.
func (th *throttle) admit(now time.Time, who string) bool {
	th.mu.Lock()
	defer th.mu.Unlock()
	if th.start.IsZero() {
		th.start, th.last, th.tokens = now, now, th.burst
	}
	if until, ok := th.waitUntil[who]; ok {
		// A few milliseconds of slack for the clock of the request's
		// arrival against that of the refusal.
		if now.Before(until.Add(-20 * time.Millisecond)) {
			th.early++
		}
		delete(th.waitUntil, who)
	}
	th.tokens = min(th.burst, th.tokens+now.Sub(th.last).Seconds()*th.rate)
	th.last = now
	i := int(now.Sub(th.start) / bucket)
	th.offered = grow(th.offered, i)
	th.offered[i]++
	if th.tokens < 1 {
		th.refused++
		th.waitUntil[who] = now.Add(retryAfter)
		return false
	}
	th.tokens--
	th.forwarded = grow(th.forwarded, i)
	th.forwarded[i]++
	return true
}

func grow(s []int, i int) []int {
	for len(s) <= i {
		s = append(s, 0)
	}
	return s
}

func (th *throttle) refuse(w http.ResponseWriter, why string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Retry-After", strconv.Itoa(int(retryAfter/time.Second)))
	w.WriteHeader(th.status)
	fmt.Fprintf(w, `{"error":[%q]}`, why)
}

func (th *throttle) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	who := th.requester(r, body)
	if !th.admit(time.Now(), who) {
		th.refuse(w, fmt.Sprintf("over %g requests a second; try again later", th.rate))
		return
	}
	if r.Method != http.MethodPost || r.URL.Path != "/clients" {
		th.proxy.ServeHTTP(w, r)
		return
	}
	rec := &recorder{header: http.Header{}}
	th.proxy.ServeHTTP(rec, r)
	th.mu.Lock()
	th.postClients++
	lose := rec.status == http.StatusCreated && th.loseEvery > 0 && th.postClients%th.loseEvery == 0
	if lose {
		th.lost++
		th.waitUntil[who] = time.Now().Add(retryAfter)
	}
	if rec.status == http.StatusConflict {
		th.conflicts++
	}
	th.mu.Unlock()
	if lose {
		th.refuse(w, "the answer was lost")
		return
	}
	for k, v := range rec.header {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.status)
	_, _ = w.Write(rec.body.Bytes())
}

// recorder keeps an answer so that the proxy can drop it.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.body.Write(b)
}

func (r *recorder) WriteHeader(status int) { r.status = status }

// peak is the most requests counted in any one second.
func peak(counts []int) int {
	per := int(time.Second / bucket)
	best, sum := 0, 0
	for i, c := range counts {
		sum += c
		if i >= per {
			sum -= counts[i-per]
		}
		best = max(best, sum)
	}
	return best
}

// throttleStats is what the proxy saw.
type throttleStats struct {
	Offered, Forwarded         int
	PeakOffered, PeakForwarded int
	Refused, Lost, Conflicts   int
	Early                      int
}

func (th *throttle) stats() throttleStats {
	th.mu.Lock()
	defer th.mu.Unlock()
	sum := func(s []int) int {
		n := 0
		for _, c := range s {
			n += c
		}
		return n
	}
	return throttleStats{
		Offered: sum(th.offered), Forwarded: sum(th.forwarded),
		PeakOffered: peak(th.offered), PeakForwarded: peak(th.forwarded),
		Refused: th.refused, Lost: th.lost, Conflicts: th.conflicts, Early: th.early,
	}
}

// perSecond is what the proxy was offered and let through in each second
// from origin on.
func (th *throttle) perSecond(origin time.Time) (offered, forwarded []int) {
	th.mu.Lock()
	defer th.mu.Unlock()
	skip := int(origin.Sub(th.start) / bucket)
	fold := func(counts []int) []int {
		var out []int
		for i, c := range counts {
			if i < skip {
				continue
			}
			s := (i - skip) * int(bucket) / int(time.Second)
			for len(out) <= s {
				out = append(out, 0)
			}
			out[s] += c
		}
		return out
	}
	return fold(th.offered), fold(th.forwarded)
}
