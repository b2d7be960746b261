package testenv

import (
	"fmt"
	"os/exec"
	"syscall"
	"testing"
)

// Process is a peer's process (goiardi, the IMDS emulator), watched so
// that a test waiting on the peer can tell that it died instead of waiting
// for an answer that will never come.
type Process struct {
	cmd    *exec.Cmd
	exited chan struct{}
	// err is how the process ended, set before exited is closed.
	err error
}

// startProcess starts cmd and kills it when the test ends.
func startProcess(t testing.TB, cmd *exec.Cmd) *Process {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	p := &Process{cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(p.Kill)
	return p
}

// Exited is closed once the process has ended: it crashed, was killed, or
// the test is over.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// Alive returns nil while the process runs, and how it ended once it has.
func (p *Process) Alive() error {
	select {
	case <-p.exited:
	default:
		return nil
	}
	if p.err == nil {
		return fmt.Errorf("pid %d exited with status 0", p.cmd.Process.Pid)
	}
	return fmt.Errorf("pid %d exited: %w", p.cmd.Process.Pid, p.err)
}

// Kill ends the process at once, as a crash would, and returns once it is
// gone. SIGKILL cannot be caught, so the wait is bounded by the kernel.
func (p *Process) Kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}
