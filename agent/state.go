package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/imds"
)

// Where the agent keeps what it knows (under its root).
const (
	stateDir  = "/var/lib/bootagent"
	statePath = stateDir + "/state.json"
	// agentLockPath is held by `run` and `once` for their life, so that
	// two never work on the same instance at once and `clean` cannot pull
	// the state from under a running agent.
	agentLockPath = stateDir + "/agent.lock"
)

// stateVersion is bumped when State changes incompatibly.
const stateVersion = 1

// Phase is where the agent is in its work.
type Phase int

// The phases, in the order a first boot goes through them.
const (
	PhaseStarting Phase = iota
	PhaseWaitingIMDS
	PhaseApplyingHostname
	PhaseRegistering
	PhaseConverging
	PhaseIdle
	PhaseFailed
	PhaseStopping
	PhaseWarmPool
	PhaseTerminating
	PhaseDeregistered
)

var phaseNames = []string{"starting", "waiting_for_imds", "applying_hostname", "registering", "converging", "idle", "failed", "stopping",
	"warm_pool", "terminating", "deregistered"}

func (p Phase) String() string {
	if p < 0 || int(p) >= len(phaseNames) {
		return fmt.Sprintf("phase(%d)", int(p))
	}
	return phaseNames[p]
}

// MarshalText writes the phase by name.
func (p Phase) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText reads a phase name.
func (p *Phase) UnmarshalText(b []byte) error {
	for i, n := range phaseNames {
		if n == string(b) {
			*p = Phase(i)
			return nil
		}
	}
	return fmt.Errorf("unknown phase %q", b)
}

// State is what the agent knows of this instance, kept in
// /var/lib/bootagent/state.json. Each fact is saved only once the step it
// records is done, so after a crash the state never claims more than was
// done.
type State struct {
	Version    int    `json:"version"`
	InstanceID string `json:"instance_id,omitempty"`
	Phase      Phase  `json:"phase"`
	// Status is the line systemd shows.
	Status string `json:"status,omitempty"`
	// Error is why the agent failed, in PhaseFailed.
	Error string `json:"error,omitempty"`
	// Bootstrapped is true once this boot's host name is applied and the
	// instance is registered (or registration is off): what READY=1 means.
	Bootstrapped   bool   `json:"bootstrapped"`
	Hostname       string `json:"hostname,omitempty"`
	HostnameSource string `json:"hostname_source,omitempty"`
	NodeName       string `json:"node_name,omitempty"`
	// ClientName is the Chef client, which is the node's name.
	ClientName   string     `json:"client_name,omitempty"`
	RegisteredAt *time.Time `json:"registered_at,omitempty"`
	// FirstRunDone is true once a chef-client run with the first-boot JSON
	// succeeded; later runs go without it.
	FirstRunDone bool          `json:"first_run_done"`
	Boot         Boot          `json:"boot"`
	LastRun      *chef.Outcome `json:"last_run,omitempty"`
	NextRun      *time.Time    `json:"next_run,omitempty"`
	// Notices is what IMDS last announced: Auto Scaling lifecycle, spot
	// interruption, rebalance, scheduled maintenance.
	Notices *imds.Notices `json:"notices,omitempty"`
	// Deregistration is the removal of the node and client at termination.
	Deregistration *Deregistration `json:"deregistration,omitempty"`
	// PID is the agent process that wrote the state last.
	PID     int       `json:"pid,omitempty"`
	Updated time.Time `json:"updated"`
}

// Deregistration records the removal of the node and client from the Chef
// server.
type Deregistration struct {
	At     time.Time `json:"at"`
	Reason string    `json:"reason"`
	chef.Deregistered
	// LeftBehind is what is still on the server, for an operator to remove.
	LeftBehind []string `json:"left_behind,omitempty"`
	Error      string   `json:"error,omitempty"`
}

// Boot is this boot's timeline.
type Boot struct {
	Started time.Time `json:"started"`
	Steps   []Step    `json:"steps,omitempty"`
}

// loadState reads the state under root. No file is the state of an image
// that never booted; an unreadable one is reported and treated the same,
// since every step the agent takes is safe to take again.
func loadState(root string) (State, error) {
	path := filepath.Join(root, statePath)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return State{Version: stateVersion}, nil
	}
	if err != nil {
		return State{Version: stateVersion}, fmt.Errorf("read %s: %w", path, err)
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil {
		return State{Version: stateVersion}, fmt.Errorf("%s is damaged (%w); starting afresh", path, err)
	}
	if s.Version != stateVersion {
		return State{Version: stateVersion}, fmt.Errorf("%s has version %d, not %d; starting afresh", path, s.Version, stateVersion)
	}
	return s, nil
}

// saveState writes the state under root, atomically.
func saveState(root string, s State) error {
	path := filepath.Join(root, statePath)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(data, '\n'), 0o644)
}

// ReadState returns the agent's state under root, for `bootagent status`.
func ReadState(root string) (State, error) {
	return loadState(root)
}
