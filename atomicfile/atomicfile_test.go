package atomicfile

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

func mustWrite(t *testing.T, root, name string, data []byte, perm os.FileMode) {
	t.Helper()
	inPlace, err := WriteFile(root, name, data, perm)
	require.NoError(t, err)
	assert.False(t, inPlace, "replaced, not rewritten in place")
}

func TestWriteFileCreatesWithTheGivenMode(t *testing.T) {
	root := t.TempDir()
	mustWrite(t, root, "/client.pem", []byte("secret"), 0o600)

	got, err := os.ReadFile(filepath.Join(root, "client.pem"))
	require.NoError(t, err)
	assert.Equal(t, "secret", string(got))
	fi, err := os.Stat(filepath.Join(root, "client.pem"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
}

func TestWriteFileMakesTheMissingDirectories(t *testing.T) {
	root := t.TempDir()
	mustWrite(t, root, "/etc/chef/client.pem", []byte("secret"), 0o600)

	for _, d := range []string{"etc", "etc/chef"} {
		fi, err := os.Stat(filepath.Join(root, d))
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o755)|os.ModeDir, fi.Mode(), d)
	}
}

// The agent's unit sets UMask=0077: the directories it makes must still
// be readable by others (node_exporter reads the metrics textfile's), and
// the files it writes get the modes asked for.
func TestTheModesDoNotDependOnTheUmask(t *testing.T) {
	old := syscall.Umask(0o077)
	t.Cleanup(func() { syscall.Umask(old) })
	root := t.TempDir()
	mustWrite(t, root, "/var/lib/node_exporter/bootagent.prom", []byte("x 1\n"), 0o644)
	f, err := OpenFile(root, "/var/lib/bootagent/lock", os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	for _, d := range []string{"var", "var/lib", "var/lib/node_exporter", "var/lib/bootagent"} {
		fi, err := os.Stat(filepath.Join(root, d))
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o755)|os.ModeDir, fi.Mode(), d)
	}
	fi, err := os.Stat(filepath.Join(root, "var/lib/node_exporter/bootagent.prom"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), fi.Mode().Perm())
}

func TestWriteFileKeepsTheModeOfAnExistingFile(t *testing.T) {
	root := t.TempDir()
	path := filepath.Join(root, "hosts")
	require.NoError(t, os.WriteFile(path, []byte("old"), 0o640))
	require.NoError(t, os.Chmod(path, 0o640))

	mustWrite(t, root, "hosts", []byte("new"), 0o644)

	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), fi.Mode().Perm(), "mode of the replaced file")
}

func TestASecretNeverInheritsALooserModeOrAnotherOwner(t *testing.T) {
	root := t.TempDir()
	path := filepath.Join(root, "client.pem")
	require.NoError(t, os.WriteFile(path, []byte("damaged"), 0o644))
	require.NoError(t, os.Chmod(path, 0o644))
	require.NoError(t, os.Chown(path, 1000, 1000))

	mustWrite(t, root, "client.pem", []byte("new key"), 0o600)

	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "a key is for its owner only")
	st := fi.Sys().(*syscall.Stat_t)
	assert.Equal(t, uint32(os.Getuid()), st.Uid, "owned by the agent, not by whoever owned the damaged file")
}

func TestWriteFileLeavesNothingBehindOnFailure(t *testing.T) {
	root := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(root, "hostname"), 0o755))

	_, err := WriteFile(root, "hostname", []byte("web01\n"), 0o644)
	require.ErrorContains(t, err, "not a regular file")

	entries, err := os.ReadDir(root)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "only the directory that was in the way remains")
}

func TestWriteFileClearsWhatAnInterruptedWriteLeft(t *testing.T) {
	root := t.TempDir()
	// A power cut while writing leaves the temporary file behind.
	require.NoError(t, os.WriteFile(filepath.Join(root, ".client.pem.tmp-123"), []byte("half a ke"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(root, ".other.tmp-1"), []byte("not ours"), 0o600))

	mustWrite(t, root, "client.pem", []byte("key"), 0o600)
	entries, err := os.ReadDir(root)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{"client.pem", ".other.tmp-1"}, names, "its own leftover removed, another file's kept")
}

func TestWriteFileWritesThroughALinkToItsTargetInsideTheRoot(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	// The same absolute name outside the root and inside it.
	require.NoError(t, os.WriteFile(filepath.Join(outside, "hosts"), []byte("the machine's"), 0o644))
	inside := filepath.Join(root, outside, "hosts")
	require.NoError(t, os.MkdirAll(filepath.Dir(inside), 0o755))
	require.NoError(t, os.WriteFile(inside, []byte("old"), 0o640))
	require.NoError(t, os.Chown(inside, 1234, 5678))
	link := filepath.Join(root, "etc/hosts")
	require.NoError(t, os.Symlink(filepath.Join(outside, "hosts"), link))

	mustWrite(t, root, "/etc/hosts", []byte("new"), 0o644)

	got, err := os.ReadFile(inside)
	require.NoError(t, err)
	assert.Equal(t, "new", string(got))
	fi, err := os.Stat(inside)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), fi.Mode().Perm(), "the target keeps its mode")
	st := fi.Sys().(*syscall.Stat_t)
	assert.Equal(t, [2]uint32{1234, 5678}, [2]uint32{st.Uid, st.Gid}, "the target keeps its owner")
	target, err := os.Readlink(link)
	require.NoError(t, err, "the link stays a link")
	assert.Equal(t, filepath.Join(outside, "hosts"), target)
	got, err = os.ReadFile(filepath.Join(outside, "hosts"))
	require.NoError(t, err)
	assert.Equal(t, "the machine's", string(got), "nothing outside the root is written")
}

func TestOpenFileNeverCreatesOutsideTheRoot(t *testing.T) {
	root := t.TempDir()
	outside := filepath.Join(t.TempDir(), "agent.lock")
	require.NoError(t, os.Symlink(outside, filepath.Join(root, "agent.lock")))

	f, err := OpenFile(root, "agent.lock", os.O_CREATE|os.O_RDWR, 0o600)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	assert.NoFileExists(t, outside)
	assert.FileExists(t, filepath.Join(root, outside))
}

func TestRemoveRemovesTheTargetInsideTheRoot(t *testing.T) {
	root := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(root, "key.real"), []byte("key"), 0o600))
	require.NoError(t, os.Symlink("/key.real", filepath.Join(root, "key")))

	require.NoError(t, Remove(root, "key"))
	assert.NoFileExists(t, filepath.Join(root, "key.real"))
	_, err := os.Lstat(filepath.Join(root, "key"))
	require.NoError(t, err, "the link stays")
	require.ErrorIs(t, Remove(root, "key"), os.ErrNotExist)
}

func TestWriteFileRewritesAMountPointInPlace(t *testing.T) {
	if !testenv.InPrivateMountNS(t) {
		return
	}
	root := t.TempDir()
	hosts := filepath.Join(root, "hosts")
	require.NoError(t, os.WriteFile(hosts, nil, 0o644))
	outside := filepath.Join(t.TempDir(), "hosts")
	require.NoError(t, os.WriteFile(outside, []byte("a longer content than the new one\n"), 0o644))
	require.NoError(t, syscall.Mount(outside, hosts, "", syscall.MS_BIND, ""))
	t.Cleanup(func() { _ = syscall.Unmount(hosts, 0) })

	inPlace, err := WriteFile(root, "hosts", []byte("new\n"), 0o644)
	require.NoError(t, err)
	assert.True(t, inPlace, "reported as rewritten in place")
	got, err := os.ReadFile(outside)
	require.NoError(t, err)
	assert.Equal(t, "new\n", string(got), "the mounted file carries the new content, cut to its length")
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	assert.Contains(t, string(mounts), " "+hosts+" ", "the bind mount is still in place")
	entries, err := os.ReadDir(root)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temporary file is left")
}

func TestReadFileRefusesWhatIsNoRegularFile(t *testing.T) {
	root := t.TempDir()
	require.NoError(t, syscall.Mkfifo(filepath.Join(root, "hosts"), 0o644))
	_, err := ReadFile(root, "/hosts")
	require.Error(t, err, "a FIFO would block the read until someone writes to it")
	assert.Contains(t, err.Error(), "not a regular file")
}
