package atomicfile

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestResolve(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"etc", "run", "var/lib"} {
		require.NoError(t, os.MkdirAll(filepath.Join(root, d), 0o755))
	}
	for link, target := range map[string]string{
		"etc/relative": "hosts.real",
		"etc/absolute": "/run/hosts",
		"etc/up":       "../../../../run/hosts",
		"etc/dangling": "/run/missing/hosts",
		"etc/chain":    "relative",
		"etc/dir":      "/var/lib",
		"etc/loop1":    "loop2",
		"etc/loop2":    "loop1",
	} {
		require.NoError(t, os.Symlink(target, filepath.Join(root, link)))
	}
	r, err := os.OpenRoot(root)
	require.NoError(t, err)
	t.Cleanup(func() { _ = r.Close() })

	tests := []struct {
		name, path, want string
	}{
		{"a plain path is kept", "/etc/hosts", "etc/hosts"},
		{"a name without a leading slash is the same", "etc/hosts", "etc/hosts"},
		{"the root itself", "/", "."},
		{"a relative link is taken beside it", "/etc/relative", "etc/hosts.real"},
		{"an absolute link starts again at the root", "/etc/absolute", "run/hosts"},
		{"dot-dot stops at the root in a link", "/etc/up", "run/hosts"},
		{"dot-dot stops at the root in the name", "/../../etc/hosts", "etc/hosts"},
		{"a dangling link names its target, to be made", "/etc/dangling", "run/missing/hosts"},
		{"links are followed one after the other", "/etc/chain", "etc/hosts.real"},
		{"a linked directory is followed", "/etc/dir/bootagent/state.json", "var/lib/bootagent/state.json"},
		{"a missing directory is kept as named", "/var/lib/bootagent/../x", "var/lib/x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := resolve(r, tt.path)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}

	t.Run("a loop is an error", func(t *testing.T) {
		_, err := resolve(r, "/etc/loop1")
		require.ErrorIs(t, err, syscall.ELOOP)
		assert.ErrorContains(t, err, "more than 40 symbolic links")
	})
	t.Run("a file is no directory", func(t *testing.T) {
		require.NoError(t, os.WriteFile(filepath.Join(root, "etc/hosts"), nil, 0o644))
		_, err := resolve(r, "/etc/hosts/x")
		require.ErrorIs(t, err, syscall.ENOTDIR)
	})
}

func TestWriteFileThroughADanglingLinkMakesTheTargetInsideTheRoot(t *testing.T) {
	root := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(root, "etc"), 0o755))
	require.NoError(t, os.Symlink("/run/bootagent/hosts", filepath.Join(root, "etc/hosts")))

	mustWrite(t, root, "/etc/hosts", []byte("new"), 0o644)
	got, err := os.ReadFile(filepath.Join(root, "run/bootagent/hosts"))
	require.NoError(t, err)
	assert.Equal(t, "new", string(got))
}
