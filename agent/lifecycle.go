package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
)

// errAgentRunning means another bootagent process works on this instance.
var errAgentRunning = errors.New("another bootagent process is working on this instance")

// lockAgent takes the agent lock without waiting, and loads the state the
// lock protects. It returns the unlock.
func (e *Engine) lockAgent() (func(), error) {
	unlock, err := flock(e.path(agentLockPath))
	if errors.Is(err, errLocked) {
		return nil, fmt.Errorf("%w (%s is held); for a chef-client run now, send SIGUSR1: systemctl kill -s USR1 bootagent", errAgentRunning, agentLockPath)
	}
	if err != nil {
		return nil, err
	}
	st, err := loadState(e.root)
	if err != nil {
		e.log.Warn("agent state", zap.Error(err))
	}
	e.mu.Lock()
	e.state = st
	e.mu.Unlock()
	return unlock, nil
}

// errLocked means a lock file is held by another process.
var errLocked = errors.New("locked")

// flock takes an exclusive lock on path without waiting and returns the
// unlock. The kernel releases it when the process dies, however it dies.
func flock(path string) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, errLocked
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// snapshot returns a copy of the state.
func (e *Engine) snapshot() State {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.state
}

// update changes the state and saves it. A state that cannot be saved is
// logged, not fatal: every step is safe to take again.
func (e *Engine) update(f func(*State)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f(&e.state)
	e.state.Version = stateVersion
	e.state.PID = os.Getpid()
	e.state.Updated = e.clock.Now().UTC()
	if err := saveState(e.root, e.state); err != nil {
		e.log.Warn("could not save the agent state", zap.Error(err))
	}
	e.m.Changed()
}

// transition moves the agent to a new phase: it logs old -> new, sets the
// STATUS line systemd shows, and saves the state.
func (e *Engine) transition(p Phase, status string) { e.setPhase(p, status, "") }

func (e *Engine) setPhase(p Phase, status, errText string) {
	var old Phase
	var id string
	e.update(func(s *State) {
		old, id = s.Phase, s.InstanceID
		s.Phase, s.Status, s.Error = p, status, errText
	})
	if old != p {
		log := e.log
		if id != "" {
			log = log.With(zap.String("instance_id", id))
		}
		log.Info("state "+old.String()+" -> "+p.String(), zap.String("status", status))
		e.m.Phase.Reset()
		e.m.Phase.WithLabelValues(p.String()).Set(1)
	}
	e.notifier.Status(status)
}

// startBoot begins this boot's timeline; nothing of it is done yet.
func (e *Engine) startBoot(at time.Time) {
	e.update(func(s *State) {
		s.Bootstrapped = false
		s.Boot = Boot{Started: at.UTC()}
	})
}

// adoptInstance compares the instance with the one the state describes. A
// different instance ID means a new instance launched from an image of a
// configured one: what the old instance registered is not ours, so its key
// and facts are dropped and the first-boot work runs again.
func (e *Engine) adoptInstance(log *zap.Logger, id string, cfg config.Config) error {
	st := e.snapshot()
	if st.InstanceID == id {
		return nil
	}
	if st.InstanceID != "" {
		log.Warn("a new instance: the state was left by another one (an image baked without `bootagent clean`?); its registration is dropped and first-boot work runs again",
			zap.String("previous_instance_id", st.InstanceID), zap.String("previous_node_name", st.NodeName))
		if err := e.forgetInstance(cfg); err != nil {
			return err
		}
	}
	e.update(func(s *State) {
		boot := s.Boot
		*s = State{InstanceID: id, Phase: s.Phase, Status: s.Status, Boot: boot}
	})
	return nil
}

// forgetInstance removes what ties the machine to an instance: the node's
// key and first-boot JSON, and client.rb, which names the node. The baked
// config and the validator stay.
func (e *Engine) forgetInstance(cfg config.Config) error {
	for _, p := range []string{cfg.Chef.ClientKey, firstBootPath, clientRBPath} {
		if err := os.Remove(e.path(p)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("forget the previous instance: %w", err)
		}
	}
	return nil
}

// Clean forgets the instance under root (state, node key, first-boot JSON,
// client.rb) so that an image can be baked from this machine; every
// instance launched from it then registers as itself. The baked config and
// the validator stay. It refuses while an agent is running, and returns
// the paths it removed.
func Clean(root string, cfg config.Config) ([]string, error) {
	unlock, err := flock(filepath.Join(root, agentLockPath))
	if errors.Is(err, errLocked) {
		return nil, fmt.Errorf("%w; stop it first: systemctl stop bootagent", errAgentRunning)
	}
	if err != nil {
		return nil, err
	}
	defer unlock()
	var removed []string
	for _, p := range []string{statePath, cfg.Chef.ClientKey, firstBootPath, clientRBPath, runLockPath} {
		switch err := os.Remove(filepath.Join(root, p)); {
		case err == nil:
			removed = append(removed, p)
		case !errors.Is(err, fs.ErrNotExist):
			return removed, fmt.Errorf("clean: %w", err)
		}
	}
	return removed, nil
}

// needsHuman reports whether a failed pass waits for someone to fix
// something (bad input, a name collision, a refused validator) rather than
// for time to pass.
func needsHuman(err error) bool {
	return errors.Is(err, config.ErrInvalid) || errors.Is(err, chef.ErrInvalid) ||
		errors.Is(err, chef.ErrNameTaken) || errors.Is(err, chef.ErrValidatorRefused)
}

// fail records a failed pass. One that needs a human puts the agent in
// PhaseFailed; one that time may fix keeps the phase, with the reason and
// the retry in the status line.
func (e *Engine) fail(err error, retry string) {
	st := e.snapshot()
	status := "failed: " + err.Error()
	if retry != "" {
		status += "; retrying " + retry
	}
	phase := st.Phase
	if needsHuman(err) {
		phase = PhaseFailed
	}
	e.setPhase(phase, status, err.Error())
}

// idle records a finished bootstrap: nothing to do until the next run.
func (e *Engine) idle(res Result) {
	e.transition(PhaseIdle, e.idleStatus(res))
}

func (e *Engine) idleStatus(res Result) string {
	st := e.snapshot()
	status := "idle"
	if !res.Hostname.IsZero() {
		status += ", hostname " + res.Hostname.String()
	}
	switch {
	case res.chef == nil:
		status += ", no Chef server configured"
	case st.NextRun != nil:
		status += ", next chef-client run at " + st.NextRun.UTC().Format(time.RFC3339)
	}
	if st.LastRun != nil {
		status += ", last run " + string(st.LastRun.Result)
	}
	return status
}
