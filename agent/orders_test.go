package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

// The event orders the first release never tried: each test here failed on
// it, before the daemon's state got a single owner.

func TestATerminationDuringALateRegistrationRemovesWhatItRegistered(t *testing.T) {
	d := newDaemon(t, "Warmed:Running")
	testenv.Eventually(t, 10*time.Second, func() bool { return d.state(t).Phase == PhaseWarmPool }, "named in the warm pool")

	// Auto Scaling puts the instance into service and takes it out again at
	// once: the termination is noticed while the registration is held up.
	held, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	d.chef.set("POST /clients", func(w http.ResponseWriter, r *http.Request) {
		once.Do(func() { close(held) })
		<-release
		d.chef.forward(w, r)
	})
	d.lifecycle.Store("InService")
	<-held
	d.lifecycle.Store("Terminated")
	testenv.Eventually(t, 10*time.Second, func() bool {
		n := d.state(t).Notices
		return n != nil && n.LifecycleState == "Terminated"
	}, "the termination is noticed")
	close(release)

	d.deregistered(t)
	d.polls(t, 3)
	assert.Empty(t, d.runs(t), "no chef-client run on an instance that is going away")
	assert.Equal(t, PhaseDeregistered, d.state(t).Phase)
}

func TestADeregistrationIsNeverRepeated(t *testing.T) {
	for _, how := range []string{"a restart", "a reload"} {
		t.Run("after "+how, func(t *testing.T) {
			d := newDaemon(t, "InService")
			d.registered(t)
			d.lifecycle.Store("Terminated")
			d.deregistered(t)
			deletes := d.count("DELETE /nodes/web01") + d.count("DELETE /clients/web01")

			if how == "a restart" {
				d.stop(t)
				d.start(t)
			} else {
				d.engine.Reload(*d.cfg)
			}
			d.polls(t, 3)
			assert.Equal(t, deletes, d.count("DELETE /nodes/web01")+d.count("DELETE /clients/web01"), "no second deletion")
			assert.Equal(t, PhaseDeregistered, d.state(t).Phase)
			assert.Zero(t, d.logged("deregistration incomplete: remove what is left by hand"))
			assert.Equal(t, 0, StatusCode(d.state(t)))
		})
	}
}

func TestAFailingNoticePathHidesNoOther(t *testing.T) {
	d := newDaemon(t, "")
	d.registered(t)
	d.imds.set("GET /latest/meta-data/events/maintenance/scheduled", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
	})
	d.imds.set("GET /latest/meta-data/spot/instance-action", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `{"action": "terminate", "time": %q}`, time.Now().Add(2*time.Minute).UTC().Format(time.RFC3339))
	})
	d.deregistered(t)
}

func TestASpotNoticeWhoseTimeHasPassedStillDeregisters(t *testing.T) {
	d := newDaemon(t, "")
	d.registered(t)
	// A clock ahead of IMDS's, or a poll that came late.
	d.imds.set("GET /latest/meta-data/spot/instance-action", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `{"action": "terminate", "time": %q}`, time.Now().Add(-time.Minute).UTC().Format(time.RFC3339))
	})
	d.deregistered(t)
}

func TestStatusFailsWhenADeregistrationLeftSomethingBehind(t *testing.T) {
	d := newDaemon(t, "InService")
	d.registered(t)
	d.chef.set("DELETE /clients/web01", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprint(w, `{"error": ["missing delete permission"]}`)
	})
	d.lifecycle.Store("Terminated")
	testenv.Eventually(t, 20*time.Second, func() bool { return d.logged("deregistration incomplete: remove what is left by hand") > 0 }, "the refusal is reported")
	testenv.Eventually(t, 10*time.Second, func() bool { dr := d.state(t).Deregistration; return dr != nil && !dr.InProgress }, "and recorded")
	st := d.state(t)
	assert.Equal(t, PhaseFailed, st.Phase)
	assert.Equal(t, []string{"client web01"}, st.Deregistration.LeftBehind)
	assert.Equal(t, 1, StatusCode(st), "a person must remove the client")
}

func TestAFinalRunWaitsForTheRunGoingAtTermination(t *testing.T) {
	d := newDaemon(t, "InService", func(c *config.Config) { c.Chef.FinalRun = true })
	d.slowRuns(t, 2*time.Second)
	testenv.Eventually(t, 20*time.Second, func() bool { return len(d.runs(t)) == 1 }, "the first run starts")
	d.lifecycle.Store("Terminated")
	d.deregistered(t)

	runs := d.runs(t)
	require.Len(t, runs, 2, "the first run, and the final one")
	finished := d.lines("chef-client run finished")
	require.Len(t, finished, 2, "both runs ran to their end; failed runs: %v", d.lines("chef-client run failed"))
	for _, f := range finished {
		assert.Equal(t, "success", f.ContextMap()["result"])
	}
	done := d.lines("deregistered: node and client deleted from the Chef server")
	require.Len(t, done, 1)
	assert.True(t, finished[1].Time.Before(done[0].Time), "the final run ends before the node is removed")
	assert.Zero(t, d.logged("chef-client run did not happen"))
	assert.Zero(t, d.logged("ending the chef-client run"), "two minutes' notice leave the run going its time")
}

func TestReloadsNeitherKillNorMultiplyRuns(t *testing.T) {
	d := newDaemon(t, "InService")
	d.slowRuns(t, 2*time.Second)
	testenv.Eventually(t, 20*time.Second, func() bool { return len(d.runs(t)) == 1 }, "the first run starts")
	for range 10 {
		d.engine.Reload(*d.cfg)
		time.Sleep(100 * time.Millisecond) // Reloads spaced as `systemctl reload` in a loop would be.
	}
	testenv.Eventually(t, 20*time.Second, func() bool { st := d.state(t); return st.LastRun != nil && st.FirstRunDone }, "the first run ends")
	d.polls(t, 2)
	assert.Len(t, d.runs(t), 1, "one first run, however many reloads")
	assert.Equal(t, chef.ResultSuccess, d.state(t).LastRun.Result, "the run was not killed")
}

func TestReloadsRaceWithNothing(t *testing.T) {
	// Under `go test -race` (as `make test` runs it), a reload that writes
	// what another goroutine reads fails this test.
	listen := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	d := newDaemon(t, "InService", func(c *config.Config) { c.Metrics.Listen = listen })
	healthz := make(chan struct{})
	var answered atomic.Int32
	go func() {
		for {
			select {
			case <-healthz:
				return
			default:
			}
			if res, err := http.Get("http://" + listen + "/healthz"); err == nil {
				_, _ = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				answered.Add(1)
			}
		}
	}()
	defer close(healthz)
	d.slowRuns(t, time.Second)
	d.engine.Reload(*d.cfg) // During the bootstrap.
	testenv.Eventually(t, 20*time.Second, func() bool { return len(d.runs(t)) == 1 }, "the first run starts")
	d.engine.Reload(*d.cfg) // During a run.
	testenv.Eventually(t, 20*time.Second, func() bool { return d.state(t).LastRun != nil }, "the run ends")
	testenv.Eventually(t, 10*time.Second, func() bool { return answered.Load() > 0 }, "/healthz answers")
}

func TestAFailedOnceRecordsTheFailure(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n", func(c *config.Config) {
		c.Chef.ClientCommand = append(c.Chef.ClientCommand, "--exit", "1")
	})
	_, err := s.engine.Once(context.Background())
	require.Error(t, err)
	st, err := ReadState(s.root)
	require.NoError(t, err)
	assert.Equal(t, PhaseFailed, st.Phase)
	assert.Contains(t, st.Error, "failed (exit code 1)")
	assert.Equal(t, 1, StatusCode(st))
}

func TestEveryAutoScalingTargetStateHasItsMeaning(t *testing.T) {
	tests := []struct {
		state string
		keep  bool
		runs  bool
	}{
		{"InService", true, true},
		{"Standby", true, true},
		{"Detached", true, true},
		{"Warmed:Running", true, false},
		{"Warmed:Stopped", true, false},
		{"Warmed:Hibernated", true, false},
		{"Terminated", false, false},
		{"Warmed:Terminated", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.state, func(t *testing.T) {
			d := newDaemon(t, "InService")
			d.registered(t)
			testenv.Eventually(t, 20*time.Second, func() bool { return d.state(t).FirstRunDone }, "the first run ends")
			d.lifecycle.Store(tt.state)
			testenv.Eventually(t, 10*time.Second, func() bool {
				n := d.state(t).Notices
				return n != nil && n.LifecycleState == tt.state
			}, "the state is noticed")
			if !tt.keep {
				d.deregistered(t)
				return
			}
			before := len(d.runs(t))
			d.engine.TriggerRun()
			d.polls(t, 3)
			node, client := d.exists(t)
			assert.True(t, node && client, "the node and client stay")
			if tt.runs {
				assert.Len(t, d.runs(t), before+1, "chef-client runs as asked")
			} else {
				assert.Len(t, d.runs(t), before, "no chef-client run while in the warm pool")
			}
		})
	}
	t.Run("returned to the warm pool, then terminated from it", func(t *testing.T) {
		d := newDaemon(t, "InService")
		d.registered(t)
		d.lifecycle.Store("Warmed:Stopped")
		d.polls(t, 2)
		node, client := d.exists(t)
		require.True(t, node && client)
		d.lifecycle.Store("Warmed:Terminated")
		d.deregistered(t)
	})
}

// The orders below broke the redesign itself, found by an adversarial pass
// against the real peers.

func TestAStateThatCannotBeSavedDuringTheDeletesGivesNoFalseAlarm(t *testing.T) {
	d := newDaemon(t, "InService")
	d.registered(t)
	testenv.Eventually(t, 20*time.Second, func() bool { return d.state(t).FirstRunDone }, "the first run ends")
	dir := filepath.Join(d.root, stateDir)
	var once sync.Once
	d.chef.set("DELETE /nodes/web01", func(w http.ResponseWriter, r *http.Request) {
		d.chef.forward(w, r)
		// From now on no state can be saved, as with a full disk.
		once.Do(func() {
			require.NoError(t, os.Rename(dir, dir+".away"))
			require.NoError(t, os.WriteFile(dir, nil, 0o644))
		})
	})
	d.lifecycle.Store("Terminated")
	testenv.Eventually(t, 20*time.Second, func() bool { n, c := d.exists(t); return !n && !c }, "node and client deleted")
	testenv.Eventually(t, 10*time.Second, func() bool { return d.logged("deregistered: node and client deleted from the Chef server") > 0 }, "the deletes end")
	d.stop(t)
	// The disk holds what was saved last: a deregistration in progress.
	require.NoError(t, os.Remove(dir))
	require.NoError(t, os.Rename(dir+".away", dir))
	require.True(t, d.state(t).Deregistration.InProgress)
	d.start(t)
	testenv.Eventually(t, 20*time.Second, func() bool { return d.state(t).Phase == PhaseDeregistered }, "the resumed deregistration ends")
	assert.Zero(t, d.logged("deregistration incomplete: remove what is left by hand"), "no false alarm: the key opens nothing because both are gone")
	assert.Equal(t, 0, StatusCode(d.state(t)))
}

func TestADamagedStateAtATerminatingRestartStillDeregisters(t *testing.T) {
	d := newDaemon(t, "InService")
	d.registered(t)
	testenv.Eventually(t, 20*time.Second, func() bool { return d.state(t).FirstRunDone }, "the first run ends")
	d.stop(t)
	require.NoError(t, os.WriteFile(filepath.Join(d.root, statePath), []byte(`{"version": 1, "instance_id": "i-0123`), 0o644))
	d.lifecycle.Store("Terminated")
	d.start(t)
	d.deregistered(t)
	assert.Equal(t, 1, d.logged("the node's key is on disk, but the state names no node (damaged or lost?): taking the configured one as registered before"))
}

func TestARestartAfterTheStopsDeregistrationMakesNoFinalRun(t *testing.T) {
	d := newDaemon(t, "InService", func(c *config.Config) { c.Chef.FinalRun = true })
	testenv.Eventually(t, 20*time.Second, func() bool { return d.state(t).FirstRunDone }, "the first run ends")
	d.slowRuns(t, 5*time.Second)
	d.engine.TriggerRun()
	testenv.Eventually(t, 10*time.Second, func() bool { return len(d.runs(t)) == 2 }, "a run is going")
	d.lifecycle.Store("Terminated")
	testenv.Eventually(t, 10*time.Second, func() bool { return d.state(t).Termination != nil }, "the termination is noticed")
	d.stop(t)
	require.True(t, d.state(t).Deregistration.Complete(), "the stop deregistered")
	d.start(t)
	d.polls(t, 5)
	assert.Zero(t, d.logged("chef-client run starting"), "no chef-client run once the node and client are deleted")
	assert.Len(t, d.runs(t), 2)
}

func TestAReloadDuringARegistrationWaitsForItsAnswer(t *testing.T) {
	d := newDaemon(t, "Warmed:Running")
	testenv.Eventually(t, 10*time.Second, func() bool { return d.state(t).Phase == PhaseWarmPool }, "named in the warm pool")
	held, release, deleted := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var holding, deleting sync.Once
	d.chef.set("POST /clients", func(w http.ResponseWriter, r *http.Request) {
		holding.Do(func() { close(held) })
		<-release
		// The server carries the request out, whatever the agent does.
		d.chef.forward(w, r.WithContext(context.Background()))
	})
	d.chef.set("DELETE /nodes/web01", func(w http.ResponseWriter, r *http.Request) {
		d.chef.forward(w, r)
		deleting.Do(func() { close(deleted) })
	})
	d.lifecycle.Store("InService")
	<-held
	d.engine.Reload(*d.cfg)
	d.lifecycle.Store("Terminated")
	// The server answers the client's creation once the agent deletes what
	// it thinks is there, or once it stops the registration and waits.
	go func() {
		stopped := make(chan struct{})
		go func() {
			testenv.Eventually(t, 20*time.Second, func() bool {
				return d.logs.FilterMessageSnippet("stopping the registration").Len() > 0
			}, "the registration is stopped")
			close(stopped)
		}()
		select {
		case <-deleted:
		case <-stopped:
		}
		close(release)
	}()
	testenv.Eventually(t, 20*time.Second, func() bool { dr := d.state(t).Deregistration; return dr != nil && !dr.InProgress }, "the deregistration ends")
	n, c := d.exists(t)
	assert.False(t, n || c, "nothing of the terminated instance is left on the Chef server")
	assert.Equal(t, PhaseDeregistered, d.state(t).Phase)
}

func TestADaemonOnAnInstanceTerminatedAtBootRegistersNothing(t *testing.T) {
	d := newDaemon(t, "Terminated")
	testenv.Eventually(t, 20*time.Second, func() bool {
		st := d.state(t)
		return st.Termination != nil && st.Phase == PhaseTerminating
	}, "the agent sees the termination")
	d.polls(t, 2)

	assert.Zero(t, d.count("POST /clients"), "no client for an instance that is going away")
	assert.Zero(t, d.count("POST /nodes"))
	assert.Empty(t, d.runs(t), "no chef-client run")
}
