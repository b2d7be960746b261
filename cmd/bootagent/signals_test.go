package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

// startBlockedOnConfig starts `bootagent run` with a config file that is a
// FIFO, and returns once the agent is reading it, with the write end the
// test holds: the agent is then loading its configuration, the earliest
// moment a test can hold it at, and a signal sent now arrives before
// anything of the daemon is built.
func startBlockedOnConfig(t *testing.T) (cmd *exec.Cmd, fifo string, hold *os.File, stderr *testenv.SyncBuffer) {
	t.Helper()
	testenv.RequirePrivateNetwork(t)
	fifo = filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))
	// Opened for reading and writing, a FIFO opens at once, and keeps what
	// is written to it until the agent reads it.
	hold, err := os.OpenFile(fifo, os.O_RDWR, 0)
	require.NoError(t, err)
	stderr = &testenv.SyncBuffer{}
	cmd = exec.Command(testenv.Tool(t, "bootagent"), "run", "--config", fifo, "--root", t.TempDir())
	cmd.Stderr = stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	waitOpen(t, cmd.Process.Pid, fifo)
	return cmd, fifo, hold, stderr
}

// waitOpen waits until process pid has path open.
func waitOpen(t *testing.T, pid int, path string) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, func() bool { return opened(pid, path) }, "the agent opens %s", path)
}

// opened reports whether process pid has path open for reading only, as
// the agent opens its config file. (A child between fork and exec holds
// the test's own descriptors, which are open for writing too.)
func opened(pid int, path string) bool {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, _ := os.ReadDir(dir)
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join(dir, fd.Name())); err != nil || target != path {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				if flags, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64); err == nil && flags&syscall.O_ACCMODE == syscall.O_RDONLY {
					return true
				}
			}
		}
	}
	return false
}

// config is what the test feeds the agent. IMDS is a port where nothing
// listens: the agent waits for it.
const fedConfig = "imds:\n  endpoint: http://127.0.0.1:9\n"

// feed writes the configuration into the FIFO the test holds, and closes
// it: the agent reads the configuration and the end of the file.
func feed(t *testing.T, hold *os.File) {
	t.Helper()
	_, err := hold.WriteString(fedConfig)
	require.NoError(t, err)
	require.NoError(t, hold.Close())
}

// feedAgain gives the agent the configuration for its next read of the
// FIFO, a reload's.
func feedAgain(t *testing.T, pid int, fifo string) {
	t.Helper()
	// The first read is over once the agent closed the FIFO; a writer
	// opened before would feed that read.
	testenv.Eventually(t, 10*time.Second, func() bool { return !opened(pid, fifo) }, "the agent has read its config")
	hold, err := os.OpenFile(fifo, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = hold.WriteString(fedConfig)
	require.NoError(t, err)
	waitOpen(t, pid, fifo)
	require.NoError(t, hold.Close())
}

func TestASignalAtStartUpIsHandledNotFatal(t *testing.T) {
	t.Run("SIGHUP reloads the config", func(t *testing.T) {
		cmd, fifo, hold, stderr := startBlockedOnConfig(t)
		require.NoError(t, cmd.Process.Signal(syscall.SIGHUP))
		feed(t, hold)
		// The reload reads the config again.
		feedAgain(t, cmd.Process.Pid, fifo)
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		require.NoError(t, cmd.Wait(), "%s", stderr)
		assert.Contains(t, stderr.String(), "SIGHUP: reloading the config")
	})
	t.Run("SIGUSR1 is a run request", func(t *testing.T) {
		cmd, _, hold, stderr := startBlockedOnConfig(t)
		require.NoError(t, cmd.Process.Signal(syscall.SIGUSR1))
		feed(t, hold)
		// Two signals sent back to back may reach the process's threads
		// in either order: SIGTERM waits for the first to be handled.
		testenv.Eventually(t, 10*time.Second, func() bool {
			return strings.Contains(stderr.String(), "SIGUSR1: chef-client run requested")
		}, "the early SIGUSR1 is handled, not fatal")
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		require.NoError(t, cmd.Wait(), "%s", stderr)
	})
	t.Run("SIGTERM stops the agent cleanly", func(t *testing.T) {
		cmd, _, hold, stderr := startBlockedOnConfig(t)
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		feed(t, hold)
		err := cmd.Wait()
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			t.Fatalf("bootagent run ended with %v; want exit status 0\n%s", exit.ProcessState, stderr)
		}
		require.NoError(t, err)
	})
}
