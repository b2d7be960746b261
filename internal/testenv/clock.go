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

// ManualClock is a clock that moves only when the test says so: waits end
// when Advance passes their deadline.
type ManualClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []manualWaiter
}

type manualWaiter struct {
	at time.Time
	ch chan time.Time
}

// NewManualClock returns a ManualClock at a fixed time.
func NewManualClock() *ManualClock {
	return &ManualClock{now: time.Date(2026, 11, 25, 8, 0, 0, 0, time.UTC)}
}

// Now returns the clock's time.
func (c *ManualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// After returns a channel that fires once the clock has been advanced by d.
func (c *ManualClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, manualWaiter{at: c.now.Add(d), ch: ch})
	return ch
}

// Advance moves the clock by d and fires every wait that is due.
func (c *ManualClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if w.at.After(c.now) {
			kept = append(kept, w)
			continue
		}
		w.ch <- c.now
	}
	c.waiters = kept
}

// Waiters reports how many waits are pending.
func (c *ManualClock) Waiters() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.waiters)
}
