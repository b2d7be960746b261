package backoff

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// instantClock never waits; it records every delay it was asked for.
type instantClock struct{ waits []time.Duration }

func (c *instantClock) Now() time.Time { return time.Unix(0, 0) }

func (c *instantClock) After(d time.Duration) <-chan time.Time {
	c.waits = append(c.waits, d)
	ch := make(chan time.Time, 1)
	ch <- time.Unix(0, 0)
	return ch
}

func TestNextGrowsDoublingUpToTheCap(t *testing.T) {
	b := New(Policy{Initial: 100 * time.Millisecond, Max: time.Second}, nil)
	var got []time.Duration
	for range 7 {
		got = append(got, b.Next())
	}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000, 1000}
	for i := range want {
		want[i] *= time.Millisecond
	}
	assert.Equal(t, want, got)
	b.Reset()
	assert.Equal(t, 100*time.Millisecond, b.Next(), "after Reset the delays start over")
}

func TestJitterStaysWithinItsFraction(t *testing.T) {
	b := New(Policy{Initial: time.Second, Max: time.Second, Jitter: 0.5}, nil)
	seen := map[time.Duration]bool{}
	for range 200 {
		d := b.Next()
		require.GreaterOrEqual(t, d, 500*time.Millisecond)
		require.LessOrEqual(t, d, time.Second)
		seen[d] = true
	}
	assert.Greater(t, len(seen), 50, "jitter should spread delays, got %d distinct values", len(seen))
}

type retryAfterErr struct{ d time.Duration }

func (e retryAfterErr) Error() string             { return "slow down" }
func (e retryAfterErr) RetryAfter() time.Duration { return e.d }

func TestRetry(t *testing.T) {
	errFlaky := errors.New("flaky")
	tests := []struct {
		name        string
		results     []error
		maxAttempts int
		wantErr     error
		wantCalls   int
		wantWaits   []time.Duration
	}{
		{
			name:      "succeeds at once without waiting",
			results:   []error{nil},
			wantCalls: 1,
		},
		{
			name:      "retries transient failures until success",
			results:   []error{errFlaky, errFlaky, nil},
			wantCalls: 3,
			wantWaits: []time.Duration{10 * time.Millisecond, 20 * time.Millisecond},
		},
		{
			name:      "stops at a permanent error without waiting",
			results:   []error{Permanent(errFlaky)},
			wantErr:   errFlaky,
			wantCalls: 1,
		},
		{
			name:        "gives up after the attempt limit with the last error",
			results:     []error{errFlaky, errFlaky, errFlaky, nil},
			maxAttempts: 3,
			wantErr:     errFlaky,
			wantCalls:   3,
			wantWaits:   []time.Duration{10 * time.Millisecond, 20 * time.Millisecond},
		},
		{
			name:      "honours a longer Retry-After",
			results:   []error{retryAfterErr{3 * time.Second}, nil},
			wantCalls: 2,
			wantWaits: []time.Duration{3 * time.Second},
		},
		{
			name:      "bounds an absurd Retry-After",
			results:   []error{retryAfterErr{24 * time.Hour}, nil},
			wantCalls: 2,
			wantWaits: []time.Duration{MaxRetryAfter},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := &instantClock{}
			b := New(Policy{Initial: 10 * time.Millisecond, Max: time.Second}, clock)
			calls := 0
			err := b.Retry(context.Background(), tt.maxAttempts, func(context.Context) error {
				calls++
				return tt.results[calls-1]
			}, nil)
			if tt.wantErr == nil {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, tt.wantErr)
				var p permanentError
				assert.False(t, errors.As(err, &p), "Retry returns the cause, not the Permanent wrapper")
			}
			assert.Equal(t, tt.wantCalls, calls, "calls")
			assert.Equal(t, tt.wantWaits, clock.waits, "waits")
		})
	}
}

// A fleet told "Retry-After: 2" must not come back in one instant: each
// waits at least what was asked, and the jitter spreads them after it.
func TestRetryAfterIsHonouredAndSpread(t *testing.T) {
	seen := map[time.Duration]bool{}
	for range 200 {
		clock := &instantClock{}
		b := New(Policy{Initial: 10 * time.Millisecond, Max: time.Second, Jitter: 0.5}, clock)
		calls := 0
		require.NoError(t, b.Retry(context.Background(), 0, func(context.Context) error {
			if calls++; calls == 1 {
				return retryAfterErr{2 * time.Second}
			}
			return nil
		}, nil))
		require.Len(t, clock.waits, 1)
		d := clock.waits[0]
		require.GreaterOrEqual(t, d, 2*time.Second, "never sooner than the server asked")
		require.LessOrEqual(t, d, 3*time.Second, "later by at most the jitter's fraction")
		seen[d] = true
	}
	assert.Greater(t, len(seen), 50, "the waits should be spread, got %d distinct values", len(seen))
}

func TestRetryStopsWhenTheContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	b := New(Policy{Initial: time.Hour, Max: time.Hour}, RealClock{})
	calls := 0
	err := b.Retry(ctx, 0, func(context.Context) error {
		calls++
		cancel()
		return errors.New("down")
	}, nil)
	require.EqualError(t, err, "down")
	assert.Equal(t, 1, calls)
}

// movingClock never waits, but moves its time on by every wait.
type movingClock struct{ now time.Time }

func (c *movingClock) Now() time.Time { return c.now }

func (c *movingClock) After(d time.Duration) <-chan time.Time {
	c.now = c.now.Add(d)
	ch := make(chan time.Time, 1)
	ch <- c.now
	return ch
}

func TestRetryUntilADeadline(t *testing.T) {
	down := errors.New("down")
	tests := []struct {
		name     string
		deadline time.Duration
		want     int
	}{
		{"retries while the next attempt starts before the deadline", 7 * time.Second, 3}, // at 0s, 1s, 3s; the next would be at 7s
		{"a deadline that has passed still gets one attempt", -time.Minute, 1},
		{"a deadline too close for a retry gets one attempt", 500 * time.Millisecond, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &movingClock{now: time.Unix(1000, 0)}
			b := New(Policy{Initial: time.Second, Max: time.Minute}, c)
			calls := 0
			err := b.RetryUntil(context.Background(), c.now.Add(tt.deadline), func(context.Context) error {
				calls++
				return down
			}, nil)
			require.ErrorIs(t, err, down)
			assert.Equal(t, tt.want, calls)
		})
	}
}
