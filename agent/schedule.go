package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
)

// runGrace is how long a chef-client run that got SIGTERM (a timeout, a
// stop) has to end before SIGKILL: long enough to release chef-client's
// own lock and report, short enough not to hold a shutdown.
const runGrace = 30 * time.Second

// splayFor spreads a fleet's runs over the splay: each instance gets its own
// fixed offset, derived from its instance ID, so that a restart of the agent
// does not reshuffle it and instances launched together do not converge
// together.
func splayFor(instanceID string, splay time.Duration) time.Duration {
	secs := uint64(splay / time.Second)
	if secs == 0 {
		return 0
	}
	h := fnv.New64a()
	h.Write([]byte(instanceID))
	return time.Duration(h.Sum64()%secs) * time.Second
}

// newRunID names a run: its start time, readable in unit names and logs,
// and a random suffix, so that two runs never share a name.
func newRunID(now time.Time) string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return now.UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(b[:])
}

// command is chef-client's command line: chef.client_command with the
// files the agent wrote, the first-boot JSON on a first run.
func (e *Engine) command(ch config.Chef, firstBoot bool) []string {
	cmd := append([]string{}, ch.ClientCommand...)
	cmd = append(cmd, "-c", e.path(clientRBPath))
	if firstBoot {
		cmd = append(cmd, "-j", e.path(ch.FirstBootPath))
	}
	return cmd
}

// checkJSONAttribs refuses a run whose client.rb names a json_attribs file
// that is not there: chef-client would fail reading it. cloud-init writes
// its first-boot file where json_attribs points by default; bootagent writes
// only chef.firstboot_path. The first run is let go: its -j wins over
// json_attribs, and it may be the converge that puts the file in place.
func (e *Engine) checkJSONAttribs(ch config.Chef, first bool) error {
	if first || ch.JSONAttribs == "" || filepath.Clean(ch.JSONAttribs) == filepath.Clean(ch.FirstBootPath) {
		return nil
	}
	if _, err := atomicfile.Stat(e.root, ch.JSONAttribs); err != nil {
		return fmt.Errorf("chef.json_attribs %s: %w: chef-client would fail reading it on every run after the first; "+
			"set chef.firstboot_path to the same path for bootagent to write it there, or bake the file into the image", ch.JSONAttribs, err)
	}
	return nil
}

// follower is a runner that can find and follow a run started by an
// earlier life of the agent (the systemd transient unit runner).
type follower interface {
	Running(ctx context.Context) (string, bool, error)
	Follow(ctx context.Context, id string) (chef.Outcome, error)
}

// runHandle is a chef-client run going: it belongs to the process, not to
// a life, so that a reload neither kills it nor starts another beside it.
type runHandle struct {
	info   runInfo
	cancel context.CancelCauseFunc
	done   chan evRunEnded
}

// startRun calls run (a chef-client run, or the following of one found
// going) in a goroutine of its own, whose end is sent on done; cancel ends
// its context, with the cause.
func startRun(info runInfo, run func(ctx context.Context) (chef.Outcome, error)) *runHandle {
	ctx, cancel := context.WithCancelCause(context.Background())
	h := &runHandle{info: info, cancel: cancel, done: make(chan evRunEnded, 1)}
	go func() {
		out, err := run(ctx)
		h.done <- evRunEnded{out: out, err: err}
	}()
	return h
}

// licenseKey is what a Chef license key is made of.
var licenseKey = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)

// runEnvPath is chef-client's environment file (root's alone), made before
// each run: the license key from chef.license_key_file, and the proxies.
const runEnvPath = "/run/bootagent/chef-client.env"

// writeRunEnvironment makes chef-client's environment file: the license
// key as CHEF_LICENSE_KEY, when there is a key file, and the proxies
// (chef.Proxies.Environment, over what chef-client would inherit). The
// key file must be its owner's alone, and the key is never logged.
func (e *Engine) writeRunEnvironment(keyFile string, proxies chef.Proxies) error {
	lines := proxies.Environment(os.Getenv)
	if keyFile != "" {
		key, err := e.readLicenseKey(keyFile)
		if err != nil {
			return err
		}
		lines = append([]string{"CHEF_LICENSE_KEY=" + key}, lines...)
	}
	if _, err := atomicfile.WriteFile(e.root, runEnvPath, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		return fmt.Errorf("chef-client's environment: %w", err)
	}
	return nil
}

// readLicenseKey reads the license key from keyFile, which must be its
// owner's alone and hold one key.
func (e *Engine) readLicenseKey(keyFile string) (string, error) {
	fi, err := atomicfile.Stat(e.root, keyFile)
	if err != nil {
		return "", fmt.Errorf("chef.license_key_file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("chef.license_key_file %s is readable by others (mode %04o): a license key is a secret; chmod 600 it", keyFile, fi.Mode().Perm())
	}
	data, err := atomicfile.ReadFile(e.root, keyFile)
	if err != nil {
		return "", fmt.Errorf("chef.license_key_file: %w", err)
	}
	key := strings.TrimSpace(string(data))
	if !licenseKey.MatchString(key) {
		// Anything else could be read differently by systemd's
		// EnvironmentFile= (quotes, backslashes, #) and by a child's
		// environment.
		return "", fmt.Errorf("chef.license_key_file %s does not hold one license key (letters, digits, '.', '_' and '-', on one line)", keyFile)
	}
	return key, nil
}

// identitySettings are the client.rb settings that name the node's
// registration: the server, the node, and its key.
var identitySettings = []string{"chef_server_url", "node_name", "client_key"}

// identity is the lines of client.rb that set identitySettings.
func identity(rb []byte) []string {
	var lines []string
	for _, l := range strings.Split(string(rb), "\n") {
		if f := strings.Fields(l); len(f) > 0 && slices.Contains(identitySettings, f[0]) {
			lines = append(lines, l)
		}
	}
	return lines
}

// refreshClientRB rewrites client.rb before a run when the configuration
// now renders it differently from the one written at registration (a
// license accepted, a log level changed): chef-client reads what the agent
// is configured with, not what it was when the node was made. A changed
// server or key is not taken: the node is registered on the server, with
// the key, that client.rb names, and chef-client pointed elsewhere would
// fail every run. The node name cannot differ, since runs follow a
// registration of this plan's name.
func (e *Engine) refreshClientRB(log *zap.Logger, want []byte) error {
	have, err := atomicfile.ReadFile(e.root, clientRBPath)
	if err == nil && bytes.Equal(have, want) {
		return nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read client.rb: %w", err)
	}
	if err == nil && !slices.Equal(identity(have), identity(want)) {
		log.Warn("chef.server_url or chef.client_key changed since the node was registered: client.rb keeps the registration's, and is not rewritten",
			zap.String("fix", "to move the node, run bootagent deregister and bootagent clean, then restart the agent: it registers anew"))
		return nil
	}
	if err := e.writeFile(log, clientRBPath, want, 0o644); err != nil {
		return fmt.Errorf("rewrite client.rb: %w", err)
	}
	log.Info("client.rb rewritten: the configuration changed since it was written", zap.String("path", e.path(clientRBPath)))
	return nil
}

// fixText is what to do about a run's result, for its error, or "".
func fixText(r chef.Result) string {
	if fix := r.Fix(); fix != "" {
		return ": " + fix
	}
	return ""
}

// tailText formats the end of a run's output for an error message.
func tailText(lines []string) string {
	if len(lines) == 0 {
		return ""
	}
	return "; last output:\n  " + strings.Join(lines, "\n  ")
}
