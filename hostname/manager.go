package hostname

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/atomicfile"
)

// system reads and sets the two names a Linux host has: the kernel's
// (transient) and the static one in /etc/hostname.
type system interface {
	Names(ctx context.Context) (kernel, static string, err error)
	SetKernel(ctx context.Context, name string) error
	SetStatic(ctx context.Context, name string) error
	String() string
}

// Policy says what Apply manages.
type Policy struct {
	// PreferFQDN makes the kernel and static names the FQDN rather than the
	// short name.
	PreferFQDN bool
	// ManageEtcHosts keeps the managed entry in /etc/hosts.
	ManageEtcHosts bool
}

// Change is one thing Apply changed.
type Change struct {
	What string `json:"what"`
	Old  string `json:"old"`
	New  string `json:"new"`
}

// Manager applies a host name under a root directory.
type Manager struct {
	root string
	sys  system
	log  *zap.Logger
}

// New returns a Manager for root. When root is "/" and systemd-hostnamed
// answers on the system bus, names are set through it, so that everything
// listening for hostname changes hears of it; otherwise the kernel name is
// set directly and /etc/hostname is written under root.
func New(ctx context.Context, root string, log *zap.Logger) *Manager {
	m := &Manager{root: root, log: log}
	if filepath.Clean(root) == "/" {
		h, err := dialHostnamed(ctx)
		if err == nil {
			m.sys = h
			log.Debug("setting names through systemd-hostnamed")
			return m
		}
		log.Debug("systemd-hostnamed not available; setting names directly", zap.Error(err))
	}
	m.sys = direct{root: root, log: log}
	return m
}

// Close releases the D-Bus connection, if any.
func (m *Manager) Close() {
	if h, ok := m.sys.(*hostnamed); ok {
		h.close()
	}
}

// Via names the way names are set, for logs.
func (m *Manager) Via() string { return m.sys.String() }

// Apply makes the host carry n and reports what it had to change; nothing
// when the host already does. /etc/hosts is written first, so that the
// new name resolves from the moment the kernel carries it.
func (m *Manager) Apply(ctx context.Context, n Name, p Policy) ([]Change, error) {
	var changes []Change
	if p.ManageEtcHosts {
		c, err := m.applyHosts(n)
		if err != nil {
			return changes, err
		}
		if c != nil {
			changes = append(changes, *c)
		}
	}
	want := n.Kernel(p.PreferFQDN)
	kernel, static, err := m.sys.Names(ctx)
	if err != nil {
		return changes, err
	}
	if static != want {
		if err := m.sys.SetStatic(ctx, want); err != nil {
			return changes, err
		}
		changes = append(changes, Change{What: "static hostname", Old: static, New: want})
	}
	if kernel != want {
		if err := m.sys.SetKernel(ctx, want); err != nil {
			return changes, err
		}
		changes = append(changes, Change{What: "kernel hostname", Old: kernel, New: want})
	}
	return changes, nil
}

func (m *Manager) applyHosts(n Name) (*Change, error) {
	old, err := atomicfile.ReadFile(m.root, "/etc/hosts")
	base := old
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// A host without /etc/hosts resolves localhost through it
		// nonetheless once there is one: it gets the standard lines.
		base = []byte(localhostLines)
	case err != nil:
		return nil, err
	}
	updated, err := EditHosts(base, n.HostsEntry())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(m.root, "etc/hosts"), err)
	}
	if bytes.Equal(old, updated) {
		return nil, nil
	}
	oldEntry, _ := ManagedEntry(old)
	if err := writeFile(m.log, m.root, "/etc/hosts", updated); err != nil {
		return nil, err
	}
	return &Change{What: "/etc/hosts entry", Old: oldEntry, New: n.HostsEntry()}, nil
}

// writeFile writes a file of the host's name under root (mode 0644 when
// new), and says so when it could not be replaced atomically.
func writeFile(log *zap.Logger, root, name string, data []byte) error {
	inPlace, err := atomicfile.WriteFile(root, name, data, 0o644)
	if inPlace {
		log.Warn(name+" is a mount point; rewritten in place, not atomically",
			zap.String("path", filepath.Join(root, name)))
	}
	return err
}

// cloudInitDropIn keeps cloud-init from setting or reverting the host name,
// and from rewriting /etc/hosts over the managed entry.
const cloudInitDropIn = `# Written by bootagent, which owns this instance's host name and its
# /etc/hosts entry: cloud-init must neither set nor revert them.
preserve_hostname: true
manage_etc_hosts: false
`

// TameCloudInit writes a cloud.cfg.d drop-in when cloud-init is installed
// under the root, so that the two do not fight over the name. It reports
// whether it wrote the file.
func (m *Manager) TameCloudInit() (bool, error) {
	installed := false
	for _, p := range []string{"/etc/cloud/cloud.cfg", "/usr/bin/cloud-init"} {
		if _, err := atomicfile.Stat(m.root, p); err == nil {
			installed = true
		}
	}
	if !installed {
		return false, nil
	}
	const path = "/etc/cloud/cloud.cfg.d/99-bootagent.cfg"
	if old, err := atomicfile.ReadFile(m.root, path); err == nil && string(old) == cloudInitDropIn {
		return false, nil
	}
	if err := writeFile(m.log, m.root, path, []byte(cloudInitDropIn)); err != nil {
		return false, err
	}
	return true, nil
}

// direct sets the kernel name with sethostname(2) and writes /etc/hostname
// under root.
type direct struct {
	root string
	log  *zap.Logger
}

func (direct) String() string { return "sethostname and /etc/hostname" }

func (d direct) Names(context.Context) (string, string, error) {
	kernel, err := os.Hostname()
	if err != nil {
		return "", "", fmt.Errorf("read kernel hostname: %w", err)
	}
	data, err := atomicfile.ReadFile(d.root, "/etc/hostname")
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", "", err
	}
	return kernel, staticName(data), nil
}

// staticName reads /etc/hostname as systemd does: the first line that is
// not a comment, trimmed.
func staticName(data []byte) string {
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") {
			return l
		}
	}
	return ""
}

func (direct) SetKernel(_ context.Context, name string) error {
	if err := syscall.Sethostname([]byte(name)); err != nil {
		return fmt.Errorf("set kernel hostname %q: %w", name, err)
	}
	return nil
}

func (d direct) SetStatic(_ context.Context, name string) error {
	return writeFile(d.log, d.root, "/etc/hostname", []byte(name+"\n"))
}
