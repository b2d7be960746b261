package atomicfile

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWriteFileCreatesWithTheGivenMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.pem")
	require.NoError(t, WriteFile(path, []byte("secret"), 0o600))

	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "secret", string(got))
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
}

func TestWriteFileKeepsTheModeOfAnExistingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hosts")
	require.NoError(t, os.WriteFile(path, []byte("old"), 0o640))
	require.NoError(t, os.Chmod(path, 0o640))

	require.NoError(t, WriteFile(path, []byte("new"), 0o600))

	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), fi.Mode().Perm(), "mode of the replaced file")
}

func TestWriteFileLeavesNothingBehindOnFailure(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "hostname")
	require.NoError(t, os.Mkdir(target, 0o755))

	err := WriteFile(target, []byte("web01\n"), 0o644)
	require.ErrorContains(t, err, "not a regular file")

	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "only the directory that was in the way remains")
}

func TestWriteFileClearsWhatAnInterruptedWriteLeft(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "client.pem")
	// A power cut while writing leaves the temporary file behind.
	require.NoError(t, os.WriteFile(filepath.Join(dir, ".client.pem.tmp-123"), []byte("half a ke"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ".other.tmp-1"), []byte("not ours"), 0o600))

	require.NoError(t, WriteFile(path, []byte("key"), 0o600))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{"client.pem", ".other.tmp-1"}, names, "its own leftover removed, another file's kept")
}
