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
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/atomicfile"
)

// statics reads and sets the static host name (/etc/hostname): through
// systemd-hostnamed when it runs, so that its listeners hear of the change,
// or directly.
type statics interface {
	Static(ctx context.Context) (string, error)
	SetStatic(ctx context.Context, name string) error
}

// hostnamedTimeout bounds connecting to systemd-hostnamed, activation
// included; past it the static name is written directly.
const hostnamedTimeout = 10 * time.Second

// Policy says what Apply manages.
type Policy struct {
	// PreferFQDN makes the kernel and static names the FQDN rather than the
	// short name.
	PreferFQDN bool
	// ManageEtcHosts keeps the managed entry in /etc/hosts.
	ManageEtcHosts bool
}

// What Apply can change; Whats lists them, for metrics that start at 0.
const (
	WhatKernel = "kernel hostname"
	WhatStatic = "static hostname"
	WhatHosts  = "/etc/hosts entry"
)

// Whats are the things Apply can change.
var Whats = []string{WhatKernel, WhatStatic, WhatHosts}

// Change is one thing Apply changed.
type Change struct {
	What string `json:"what"`
	Old  string `json:"old"`
	New  string `json:"new"`
}

// Manager applies a host name under a root directory.
type Manager struct {
	root string
	log  *zap.Logger
	// static is how the static name is set, known once ready is closed:
	// finding out (connecting to hostnamed, which D-Bus may have to start)
	// goes on while the name is not yet known, and never holds up the
	// kernel name.
	static statics
	ready  chan struct{}
}

// New returns a Manager for root. When root is "/" and systemd-hostnamed
// answers on the system bus, the static name is set through it, so that
// everything listening for hostname changes hears of it; otherwise
// /etc/hostname is written under root. The connection is made in the
// background: New does not wait for it. The kernel name is always set with
// sethostname(2), at once.
func New(ctx context.Context, root string, log *zap.Logger) *Manager {
	m := &Manager{root: root, log: log, ready: make(chan struct{})}
	if filepath.Clean(root) != "/" {
		m.static = direct{root: root, log: log}
		close(m.ready)
		return m
	}
	go func() {
		defer close(m.ready)
		h, err := dialHostnamed(ctx, hostnamedTimeout)
		if err != nil {
			log.Debug("systemd-hostnamed not available; writing /etc/hostname directly", zap.Error(err))
			m.static = direct{root: root, log: log}
			return
		}
		log.Debug("setting the static name through systemd-hostnamed")
		m.static = h
	}()
	return m
}

// Close releases the D-Bus connection, if any.
func (m *Manager) Close() {
	<-m.ready
	if h, ok := m.static.(*hostnamed); ok {
		h.close()
	}
}

// Apply makes the host carry n and reports what it had to change; nothing
// when the host already does. /etc/hosts is written first, so that the new
// name resolves from the moment the kernel carries it; the kernel name
// next, at once; the static name last, once the way to set it is known.
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
	kernel, err := os.Hostname()
	if err != nil {
		return changes, fmt.Errorf("read kernel hostname: %w", err)
	}
	if kernel != want {
		if err := syscall.Sethostname([]byte(want)); err != nil {
			return changes, fmt.Errorf("set kernel hostname %q: %w", want, err)
		}
		changes = append(changes, Change{What: WhatKernel, Old: kernel, New: want})
	}
	select {
	case <-m.ready:
	case <-ctx.Done():
		return changes, ctx.Err()
	}
	static, err := m.static.Static(ctx)
	if err != nil {
		return changes, err
	}
	if static != want {
		if err := m.static.SetStatic(ctx, want); err != nil {
			return changes, err
		}
		changes = append(changes, Change{What: WhatStatic, Old: static, New: want})
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
	return &Change{What: WhatHosts, Old: oldEntry, New: n.HostsEntry()}, nil
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

// direct reads and writes /etc/hostname under root.
type direct struct {
	root string
	log  *zap.Logger
}

func (d direct) Static(context.Context) (string, error) {
	data, err := atomicfile.ReadFile(d.root, "/etc/hostname")
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	return staticName(data), nil
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

func (d direct) SetStatic(_ context.Context, name string) error {
	return writeFile(d.log, d.root, "/etc/hostname", []byte(name+"\n"))
}
