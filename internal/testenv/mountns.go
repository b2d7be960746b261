package testenv

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"testing"
)

// mountNSEnv names the test that a re-executed test binary is to run in
// its own mount namespace.
const mountNSEnv = "BOOTAGENT_TEST_MOUNT_NS"

// InPrivateMountNS lets a test mount things without touching the machine's
// mounts. Called from the test binary `make test` started, it runs the test
// again in a child binary with mount and UTS namespaces of its own (private
// propagation, so nothing it mounts is seen outside), fails t when the
// child fails, and returns false: the caller returns. In that child it
// returns true, once it has checked that its mount namespace is not its
// parent's, and the test goes on.
func InPrivateMountNS(t *testing.T) bool {
	t.Helper()
	if os.Getenv(mountNSEnv) == t.Name() {
		self, err1 := os.Readlink("/proc/self/ns/mnt")
		parent, err2 := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", os.Getppid()))
		if err1 != nil || err2 != nil || self == parent {
			t.Fatalf("refusing to mount: this test binary shares its parent's mount namespace (%s, parent %s)", orErr(self, err1), orErr(parent, err2))
		}
		return true
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--uts", "--",
		os.Args[0], "-test.run=^"+regexp.QuoteMeta(t.Name())+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), mountNSEnv+"="+t.Name())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s in its own mount namespace: %v\n%s", t.Name(), err, out)
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name()+" ")) {
		t.Fatalf("%s did not run in its own mount namespace:\n%s", t.Name(), out)
	}
	t.Logf("%s in its own mount namespace:\n%s", t.Name(), out)
	return false
}
