package testenv

import (
	"sync"
	"time"
)

// InstantClock is a clock whose waits end at once, so that retry loops run
// without sleeping. It records every wait and advances its own time by it;
// OnWait, when set, runs before each wait returns (to bring a peer up after
// a number of failures, say).
type InstantClock struct {
	mu     sync.Mutex
	now    time.Time
	waits  []time.Duration
	OnWait func(n int, d time.Duration)
}

// NewInstantClock returns an InstantClock starting at a fixed time.
func NewInstantClock() *InstantClock {
	return &InstantClock{now: time.Date(2026, 11, 25, 8, 0, 0, 0, time.UTC)}
}

// Now returns the clock's time.
func (c *InstantClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// After records d, advances the clock by it and fires at once.
func (c *InstantClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	c.waits = append(c.waits, d)
	c.now = c.now.Add(d)
	n, now, hook := len(c.waits), c.now, c.OnWait
	c.mu.Unlock()
	if hook != nil {
		hook(n, d)
	}
	ch := make(chan time.Time, 1)
	ch <- now
	return ch
}

// Waits returns the waits asked for so far.
func (c *InstantClock) Waits() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.waits...)
}
