package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/imdsfilter"
	"github.com/bootagent/bootagent/internal/fault"
)

// Where the agent keeps what it knows (under its root).
const (
	stateDir  = "/var/lib/bootagent"
	statePath = stateDir + "/state.json"
	// agentLockPath is held by `run` and `once` for their life, so that
	// two never work on the same instance at once (nor run chef-client
	// beside each other) and `clean` cannot pull the state from under a
	// running agent.
	agentLockPath = stateDir + "/agent.lock"
)

// stateVersion is bumped when State changes incompatibly.
const stateVersion = 1

// Phase is where the agent is in its work. It is never set: it is derived
// from the facts the agent holds (see machine.phase).
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
// done; the one intent saved ahead is a registration's node name, before
// its first request, so that the state always knows what the server may
// hold. The facts that decide what the agent does (registered, a
// termination noticed, a deregistration and what it left) are read back
// at every start; Phase, Status, Error and Bootstrapped are derived from
// the facts, for `bootagent status` and scripts, and never read back.
type State struct {
	Version    int    `json:"version"`
	InstanceID string `json:"instance_id,omitempty"`
	Phase      Phase  `json:"phase"`
	// Status is the line systemd shows.
	Status string `json:"status,omitempty"`
	// Error is why the agent failed, or why its last attempt did.
	Error string `json:"error,omitempty"`
	// Bootstrapped is true once this boot's host name is applied and the
	// instance is registered (or registration is off, waits for the warm
	// pool, or is over: the instance is terminating or deregistered): what
	// READY=1 means.
	Bootstrapped   bool   `json:"bootstrapped"`
	Hostname       string `json:"hostname,omitempty"`
	HostnameSource string `json:"hostname_source,omitempty"`
	// NodeName is set when a registration begins, RegisteredAt once it is
	// done: a termination in between removes what the registration may
	// have made.
	NodeName string `json:"node_name,omitempty"`
	// ClientName is the Chef client, which is the node's name.
	ClientName   string     `json:"client_name,omitempty"`
	RegisteredAt *time.Time `json:"registered_at,omitempty"`
	// FormerNodes are nodes (and clients) this instance registered under
	// another name before, with the same key: the node name changed. They
	// are removed at termination too.
	FormerNodes []string `json:"former_nodes,omitempty"`
	// InstanceFiles are the instance's own files a registration writes
	// (the node's key, the first-boot JSON), where that boot's
	// configuration, user-data included, put them: clean removes them
	// there, whatever the baked config says.
	InstanceFiles []string `json:"instance_files,omitempty"`
	// FirstRunDone is true once a chef-client run with the first-boot JSON
	// succeeded; later runs go without it.
	FirstRunDone bool          `json:"first_run_done"`
	Boot         Boot          `json:"boot"`
	LastRun      *chef.Outcome `json:"last_run,omitempty"`
	// LastSuccess is when the last run that did not fail started;
	// FailingSince when the first failed run after it did, while the runs
	// fail.
	LastSuccess  *time.Time `json:"last_success,omitempty"`
	FailingSince *time.Time `json:"failing_since,omitempty"`
	NextRun      *time.Time `json:"next_run,omitempty"`
	// Run is the chef-client run going, if any, so that a restart that
	// finds its unit still running follows it as what it is.
	Run *RunGoing `json:"run,omitempty"`
	// Notices is what IMDS last announced: Auto Scaling lifecycle, spot
	// interruption, rebalance, scheduled maintenance.
	Notices *imds.Notices `json:"notices,omitempty"`
	// IMDSFilter is what the kernel's table holds when `bootagent status`
	// reads it (ReadFilter); the daemon never saves it.
	IMDSFilter *FilterStatus `json:"imds_filter,omitempty"`
	// Termination is set once a notice says the instance is going away.
	// It is final: the instance never comes back.
	Termination *Termination `json:"termination,omitempty"`
	// Deregistration is the removal of the node and client, at termination
	// or by hand.
	Deregistration *Deregistration `json:"deregistration,omitempty"`
	// PID is the agent process that wrote the state last.
	PID     int       `json:"pid,omitempty"`
	Updated time.Time `json:"updated"`
}

// RunGoing is a chef-client run the agent started and has not seen end.
type RunGoing struct {
	ID string `json:"id"`
	// First runs with the first-boot JSON; Final is the last run before
	// the deregistration.
	First   bool      `json:"first,omitempty"`
	Final   bool      `json:"final,omitempty"`
	Started time.Time `json:"started"`
}

// Termination is what the agent knows of the instance's end.
type Termination struct {
	NoticedAt time.Time `json:"noticed_at"`
	// Reason is the notice, for people.
	Reason string `json:"reason"`
	// Deadline is when the instance goes away: the spot notice's time, or
	// two minutes after an Auto Scaling termination was noticed.
	Deadline time.Time `json:"deadline"`
	// FinalRunDone is true once the final chef-client run
	// (chef.final_run) was made, or there was no time for it.
	FinalRunDone bool `json:"final_run_done,omitempty"`
}

// Deregistration records the removal of the node and client from the Chef
// server.
type Deregistration struct {
	At     time.Time `json:"at"`
	Reason string    `json:"reason"`
	chef.Deregistered
	// InProgress is true while the deletions are being made; a restart
	// finds it and finishes them.
	InProgress bool `json:"in_progress,omitempty"`
	// LeftBehind is what is still on the server, for an operator to remove.
	LeftBehind []string `json:"left_behind,omitempty"`
	Error      string   `json:"error,omitempty"`
	// Refused is true when the server refused a deletion (403, or a key it
	// no longer accepts): asking again will not help, a person must act.
	Refused bool `json:"refused,omitempty"`
}

// Complete reports whether the deregistration ended with nothing of the
// instance left on the server.
func (d *Deregistration) Complete() bool {
	return d != nil && !d.InProgress && d.NodeDeleted && d.ClientDeleted && len(d.LeftBehind) == 0
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
	data, err := atomicfile.ReadFile(root, statePath)
	if errors.Is(err, fs.ErrNotExist) {
		return State{Version: stateVersion}, nil
	}
	if err != nil {
		return State{Version: stateVersion}, err
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

// ReadState returns the agent's state under root, for `bootagent status`.
func ReadState(root string) (State, error) { return loadState(root) }

// store saves the state under root, atomically, and only when it changed:
// the owner of the state offers it after every event, and most change
// nothing.
type store struct {
	root string
	last []byte
}

// save writes s unless it says what the last save said; Updated and PID
// are set on what is written.
func (w *store) save(s State, now time.Time) error {
	s.Version, s.PID, s.Updated = stateVersion, 0, time.Time{}
	facts, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if bytes.Equal(facts, w.last) {
		return nil
	}
	s.PID, s.Updated = os.Getpid(), now.UTC()
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if _, err := atomicfile.WriteFile(w.root, statePath, append(data, '\n'), 0o644); err != nil {
		return err
	}
	w.last = facts
	if s.RegisteredAt != nil {
		fault.Point("state-saved")
	}
	return nil
}

// errAgentRunning means another bootagent process works on this instance.
var errAgentRunning = errors.New("another bootagent process is working on this instance")

// lockAgent takes the agent lock under root without waiting. It returns
// the unlock.
func lockAgent(root string) (func(), error) {
	unlock, err := flock(root, agentLockPath)
	if errors.Is(err, errLocked) {
		return nil, fmt.Errorf("%w (%s is held); for a chef-client run now, send SIGUSR1: systemctl kill -s USR1 bootagent", errAgentRunning, agentLockPath)
	}
	return unlock, err
}

// errLocked means a lock file is held by another process.
var errLocked = errors.New("locked")

// flock takes an exclusive lock on the file name under root without
// waiting and returns the unlock. The kernel releases it when the process
// dies, however it dies. The file is made when missing, never outside the
// root: a link to it is followed inside the root only.
func flock(root, name string) (func(), error) {
	f, err := atomicfile.OpenFile(root, name, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, errLocked
		}
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil
}

// instanceFiles are the files that tie the machine to one instance: the
// node's key, the first-boot JSON, and client.rb, which names the node. The
// baked config and the validator are the image's.
func instanceFiles(cfg config.Config) []string {
	return []string{cfg.Chef.ClientKey, cfg.Chef.FirstBootPath, clientRBPath, runEnvPath}
}

// Clean forgets the instance under root (state, node key, first-boot JSON,
// client.rb, chef-client's environment file) so that an image can be baked from this machine; every
// instance launched from it then registers as itself. The baked config and
// the validator stay. A file that is a link goes at its target inside the
// root, as it was written. It refuses while an agent is running, and
// returns the paths it removed.
func Clean(root string, cfg config.Config) ([]string, error) {
	unlock, err := flock(root, agentLockPath)
	if errors.Is(err, errLocked) {
		return nil, fmt.Errorf("%w; stop it first: systemctl stop bootagent", errAgentRunning)
	}
	if err != nil {
		return nil, err
	}
	defer unlock()
	files := instanceFiles(cfg)
	if st, err := loadState(root); err == nil {
		for _, p := range st.InstanceFiles {
			if !slices.Contains(files, p) {
				files = append(files, p)
			}
		}
	}
	var removed []string
	for _, p := range append([]string{statePath}, files...) {
		switch err := atomicfile.Remove(root, p); {
		case err == nil:
			removed = append(removed, p)
		case !errors.Is(err, fs.ErrNotExist):
			return removed, fmt.Errorf("clean: %w", err)
		}
	}
	// The filter is the running instance's, and like the kernel's host
	// name not a path under root; the image's config puts it back at the
	// next boot. An image built where nftables cannot be read (a chroot,
	// a container without CAP_NET_ADMIN) has none of the agent's.
	switch gone, err := RemoveFilter(); {
	case err != nil && noFilterHere(err):
	case err != nil:
		return removed, fmt.Errorf("clean: %w", err)
	case gone:
		removed = append(removed, "nftables table inet "+imdsfilter.Table)
	}
	return removed, nil
}
