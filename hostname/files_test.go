package hostname

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/bootagent/bootagent/internal/testenv"
)

func observed(t *testing.T) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.DebugLevel)
	return zap.New(zapcore.NewTee(core, zaptest.NewLogger(t).Core())), logs
}

func TestApplyRewritesABindMountedHostsFileInPlace(t *testing.T) {
	if !testenv.InPrivateMountNS(t) {
		return
	}
	root := newRoot(t)
	// What a container runtime or systemd-nspawn --bind does: the host's
	// file is mounted over the guest's.
	outside := filepath.Join(t.TempDir(), "hosts")
	require.NoError(t, os.WriteFile(outside, []byte(debianHosts(t)), 0o644))
	hosts := filepath.Join(root, "etc/hosts")
	require.NoError(t, syscall.Mount(outside, hosts, "", syscall.MS_BIND, ""))
	t.Cleanup(func() { _ = syscall.Unmount(hosts, 0) })

	log, logs := observed(t)
	m := New(context.Background(), root, log)
	n, err := Make("web01", "example.internal")
	require.NoError(t, err)
	_, err = m.Apply(context.Background(), n, Policy{ManageEtcHosts: true})
	require.NoError(t, err)

	assert.Contains(t, readFile(t, hosts), "\n127.0.1.1\tweb01.example.internal web01\n")
	assert.Equal(t, readFile(t, outside), readFile(t, hosts), "the mounted file itself carries the entry")
	mounts := readFile(t, "/proc/self/mountinfo")
	assert.Contains(t, mounts, " "+hosts+" ", "the bind mount is still in place")
	assert.Equal(t, 1, logs.FilterMessageSnippet("is a mount point; rewritten in place, not atomically").Len(), "the log says the write was not atomic")
}

func TestApplyWritesThroughASymlinkedHostsFile(t *testing.T) {
	tests := []struct {
		name, link, target string
	}{
		{"a relative link", "hosts.real", "etc/hosts.real"},
		// Under the root, /run/hosts means root/run/hosts, never the
		// machine's own.
		{"an absolute link", "/run/hosts", "run/hosts"},
		{"a link to a target not made yet", "/run/bootagent/hosts", "run/bootagent/hosts"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			testenv.RequirePrivateUTS(t)
			root := newRoot(t)
			hosts := filepath.Join(root, "etc/hosts")
			target := filepath.Join(root, tt.target)
			exists := !strings.Contains(tt.target, "bootagent")
			if exists {
				require.NoError(t, os.MkdirAll(filepath.Dir(target), 0o755))
				require.NoError(t, os.Rename(hosts, target))
				require.NoError(t, os.Chmod(target, 0o640))
				require.NoError(t, os.Chown(target, 1234, 1234))
			} else {
				require.NoError(t, os.Remove(hosts))
			}
			require.NoError(t, os.Symlink(tt.link, hosts))

			m := New(context.Background(), root, zaptest.NewLogger(t))
			n, err := Make("web01", "example.internal")
			require.NoError(t, err)
			_, err = m.Apply(context.Background(), n, Policy{ManageEtcHosts: true})
			require.NoError(t, err)

			got, err := os.Readlink(hosts)
			require.NoError(t, err, "/etc/hosts is still a link")
			assert.Equal(t, tt.link, got)
			assert.Contains(t, readFile(t, target), "\n127.0.1.1\tweb01.example.internal web01\n")
			if !exists {
				return
			}
			assert.Contains(t, readFile(t, target), "127.0.1.1\tdebian\n", "the target's lines stay")
			fi, err := os.Stat(target)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o640), fi.Mode().Perm(), "the target keeps its mode")
			assert.Equal(t, uint32(1234), fi.Sys().(*syscall.Stat_t).Uid, "the target keeps its owner")
		})
	}
}

func TestApplyOnAnEmptyRootMakesAStandardHostsFile(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	root := t.TempDir()
	m := New(context.Background(), root, zaptest.NewLogger(t))
	n, err := Make("web01", "example.internal")
	require.NoError(t, err)
	_, err = m.Apply(context.Background(), n, Policy{PreferFQDN: true, ManageEtcHosts: true})
	require.NoError(t, err)

	assert.Equal(t, "127.0.0.1\tlocalhost\n"+
		beginMarker+"\n127.0.1.1\tweb01.example.internal web01\n"+endMarker+"\n"+
		"::1\tlocalhost ip6-localhost ip6-loopback\n",
		readFile(t, filepath.Join(root, "etc/hosts")))
	assert.Equal(t, "web01.example.internal\n", readFile(t, filepath.Join(root, "etc/hostname")))
	fi, err := os.Stat(filepath.Join(root, "etc"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o755), fi.Mode().Perm())
}

func debianHosts(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("testdata/hosts/debian.in")
	require.NoError(t, err)
	return string(b)
}
