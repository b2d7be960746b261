// Package backoff is the agent's one retry discipline: capped, jittered
// exponential delays that honour the context and take an injectable clock, so
// that every wait in the agent can be tested without sleeping.
package backoff

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"
)

// Clock is the part of the time package that waiting needs. Tests inject one
// that does not wait.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

// RealClock is the wall clock.
type RealClock struct{}

// Now returns the current time.
func (RealClock) Now() time.Time { return time.Now() }

// After waits for d on the wall clock.
func (RealClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Policy shapes the delays between attempts.
type Policy struct {
	// Initial is the delay after the first failure.
	Initial time.Duration
	// Max caps every delay.
	Max time.Duration
	// Jitter is the fraction of each delay that is random: a delay d becomes
	// a uniform draw from [d*(1-Jitter), d]. Jitter spreads a fleet that failed
	// together so that it does not retry together.
	Jitter float64
}

// Backoff counts consecutive failures and turns them into delays. It is not
// safe for concurrent use; each retry loop owns one.
type Backoff struct {
	policy   Policy
	clock    Clock
	failures int
}

// New returns a Backoff with no failures counted.
func New(p Policy, c Clock) *Backoff {
	if c == nil {
		c = RealClock{}
	}
	return &Backoff{policy: p, clock: c}
}

// Next counts one more failure and returns how long to wait before the next
// attempt: Initial doubled per earlier failure, capped at Max, with jitter.
func (b *Backoff) Next() time.Duration {
	d := b.policy.Initial
	for i := 0; i < b.failures && d < b.policy.Max; i++ {
		d *= 2
	}
	d = min(d, b.policy.Max)
	b.failures++
	if b.policy.Jitter > 0 && d > 0 {
		d -= time.Duration(rand.Float64() * b.policy.Jitter * float64(d))
	}
	return d
}

// Reset forgets the failures, after a success.
func (b *Backoff) Reset() { b.failures = 0 }

// Wait blocks for d, or until ctx ends, whichever is first.
func Wait(ctx context.Context, c Clock, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-c.After(d):
		return nil
	}
}

// permanentError marks an error that retrying cannot fix.
type permanentError struct{ err error }

func (p permanentError) Error() string { return p.err.Error() }
func (p permanentError) Unwrap() error { return p.err }

// Permanent wraps err so that Retry returns it at once instead of retrying.
// A nil err stays nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return permanentError{err}
}

// MaxRetryAfter bounds the delay a server can ask for: long enough for any
// overloaded Chef server or IMDS to recover, short enough that a hostile or
// broken answer cannot park the agent for good.
const MaxRetryAfter = 10 * time.Minute

// RetryAfter is implemented by errors that carry the server's own idea of
// when to try again (an HTTP Retry-After header).
type RetryAfter interface {
	RetryAfter() time.Duration
}

// after turns a delay the server asked for into the one to wait: never
// sooner than asked (up to MaxRetryAfter), and later by a random part of up
// to Jitter of it, because a server that throttles a fleet tells every
// instance the same Retry-After, and a fleet that obeyed it to the
// millisecond would come back in the same instant.
func (b *Backoff) after(d time.Duration) time.Duration {
	d = min(d, MaxRetryAfter)
	if b.policy.Jitter > 0 {
		d += time.Duration(rand.Float64() * b.policy.Jitter * float64(d))
	}
	return d
}

// Retry calls op until it succeeds, returns a Permanent error, fails
// maxAttempts times (0 means no limit), or ctx ends. Before each new attempt it
// calls onRetry, when not nil, with the failure and the delay it will wait.
// A delay the error asks for through RetryAfter is honoured when longer than
// the backoff's own, spread by the policy's jitter (see after). It returns the last error of op, unwrapped from Permanent.
func (b *Backoff) Retry(ctx context.Context, maxAttempts int, op func(context.Context) error, onRetry func(err error, delay time.Duration)) error {
	return b.retry(ctx, func(attempt int, _ time.Duration) bool { return maxAttempts > 0 && attempt >= maxAttempts }, op, onRetry)
}

// RetryUntil is Retry bounded by a deadline instead of a count: the first
// attempt is made however late it is, and another only when it can start
// before the deadline. A deadline that has passed (a notice read late, a
// clock ahead) still gets its one attempt.
func (b *Backoff) RetryUntil(ctx context.Context, deadline time.Time, op func(context.Context) error, onRetry func(err error, delay time.Duration)) error {
	return b.retry(ctx, func(_ int, delay time.Duration) bool { return !b.clock.Now().Add(delay).Before(deadline) }, op, onRetry)
}

// retry is the loop of Retry and RetryUntil; done says, after a failed
// attempt and before the wait, whether to give up.
func (b *Backoff) retry(ctx context.Context, done func(attempt int, delay time.Duration) bool, op func(context.Context) error, onRetry func(err error, delay time.Duration)) error {
	for attempt := 1; ; attempt++ {
		err := op(ctx)
		if err == nil {
			b.Reset()
			return nil
		}
		var p permanentError
		if errors.As(err, &p) {
			return p.err
		}
		if ctx.Err() != nil {
			return err
		}
		delay := b.Next()
		var ra RetryAfter
		if errors.As(err, &ra) && ra.RetryAfter() > delay {
			delay = b.after(ra.RetryAfter())
		}
		if done(attempt, delay) {
			return err
		}
		if onRetry != nil {
			onRetry(err, delay)
		}
		if werr := Wait(ctx, b.clock, delay); werr != nil {
			return err
		}
	}
}
