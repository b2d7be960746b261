// Package testenv gives tests their real peers and guards the machine they
// run on: tests that set a kernel host name or talk to a metadata service
// refuse to run outside the private namespaces `make test` creates.
package testenv

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// RequirePrivateUTS fails the test unless the process has a UTS namespace
// of its own, apart from its parent's, so that setting the kernel host name
// cannot rename the machine. `make test` runs every test binary under
// `unshare --uts`.
func RequirePrivateUTS(t testing.TB) {
	t.Helper()
	self, err1 := os.Readlink("/proc/self/ns/uts")
	parent, err2 := os.Readlink(fmt.Sprintf("/proc/%d/ns/uts", os.Getppid()))
	if err1 != nil || err2 != nil || self == parent {
		t.Fatalf("refusing to set the kernel host name: this test binary shares its parent's UTS namespace (%s, parent %s); run the tests with `make test`", orErr(self, err1), orErr(parent, err2))
	}
}

// RequirePrivateNetwork fails the test unless the only network interface is
// loopback, so that nothing the test sends can leave the machine (the real
// IMDS address included). `make test` runs the tests under `unshare --net`.
func RequirePrivateNetwork(t testing.TB) {
	t.Helper()
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatalf("list network interfaces: %v", err)
	}
	for _, i := range ifaces {
		if i.Flags&net.FlagLoopback == 0 {
			t.Fatalf("refusing to open network connections: interface %s leads off this machine; run the tests with `make test`", i.Name)
		}
	}
}

// AddLocalAddress gives the loopback interface of the test's own network
// namespace one more address (a documentation address, never IMDS's) until
// the test ends: an address that is the machine's own but not loopback,
// which proxy rules treat as any other host. It refuses unless the only
// interface is loopback and an ancestor of the test (`make`, above
// `unshare --net`) is in another network namespace than the test's.
func AddLocalAddress(t testing.TB, cidr string) {
	t.Helper()
	RequirePrivateNetwork(t)
	if !inNetworkNamespaceMadeBelow() {
		t.Fatal("refusing to add an address: no ancestor of this test is in another network namespace, so this one may be the machine's; run the tests with `make test`")
	}
	if out, err := exec.Command("ip", "address", "add", cidr, "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("ip address add %s dev lo: %v: %s", cidr, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "address", "del", cidr, "dev", "lo").Run() })
}

// RequireOwnFirewall fails the test unless the network namespace is the
// test's own (only loopback, and an ancestor in another namespace), so that
// the nftables tables the test makes and deletes are nobody else's.
func RequireOwnFirewall(t testing.TB) {
	t.Helper()
	RequirePrivateNetwork(t)
	if !inNetworkNamespaceMadeBelow() {
		t.Fatal("refusing to change nftables: no ancestor of this test is in another network namespace, so this one may be the machine's; run the tests with `make test`")
	}
}

// inNetworkNamespaceMadeBelow reports whether an ancestor of this process
// (`make`, above `unshare --net`) is in another network namespace: then
// this one was made for the tests.
func inNetworkNamespaceMadeBelow() bool {
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return false
	}
	for pid := os.Getppid(); pid > 1; {
		ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			return false
		}
		if ns != self {
			return true
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return false
		}
		// The parent's pid is the second field after the command's ")".
		fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		if len(fields) < 2 {
			return false
		}
		if pid, err = strconv.Atoi(fields[1]); err != nil {
			return false
		}
	}
	return false
}

// SyncBuffer is a process's output, readable while it is written.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String is what was written so far.
func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Tool returns the path of an executable the tests need, installed by
// `make test` into the directory on PATH.
func Tool(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed; `make test` installs it (%v)", name, err)
	}
	return path
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// WaitListening polls until something accepts connections on addr, or fails
// the test after timeout.
func WaitListening(t testing.TB, addr string, timeout time.Duration, exited <-chan struct{}) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			t.Fatalf("the server meant to listen on %s exited", addr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s after %s: %v", addr, timeout, err)
		}
		time.Sleep(20 * time.Millisecond) // Polling a condition with a deadline.
	}
}

// Later is a text made when it is printed: given to Eventually as an
// argument (a journal, a log), the failure shows it as it is at the end of
// the wait, not at its start.
type Later func() string

func (l Later) String() string { return l() }

// Eventually polls cond until it is true, or fails the test with msg after
// timeout.
func Eventually(t testing.TB, timeout time.Duration, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", timeout, fmt.Sprintf(msg, args...))
		}
		time.Sleep(10 * time.Millisecond) // Polling a condition with a deadline.
	}
}

func orErr(s string, err error) string {
	if err != nil {
		return err.Error()
	}
	return s
}

// Gzip compresses s, as `gzip -c` would, for user-data tests.
func Gzip(t testing.TB, s string) []byte {
	t.Helper()
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	if _, err := w.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}
