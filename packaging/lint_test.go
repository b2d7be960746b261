package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// nobody is the user the linters run as: neither needs root, and an
// unprivileged linter cannot write outside its own directory, whatever a
// package holds.
const nobody = "65534"

// lintDir is a directory the linters can read the package from and work
// in, as nobody: the package, a cpio that keeps every name relative, and
// a scratch directory of nobody's own for HOME and TMPDIR.
func lintDir(t *testing.T, pkg string) (dir, copied string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "bootagent-lint-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	data, err := os.ReadFile(pkg)
	require.NoError(t, err)
	copied = filepath.Join(dir, filepath.Base(pkg))
	require.NoError(t, os.WriteFile(copied, data, 0o644))
	// nfpm's rpm payload names files by absolute path, and rpmlint
	// unpacks it with `rpm2cpio | cpio -id`, which would write them
	// there: this cpio keeps them inside rpmlint's directory.
	require.NoError(t, os.Mkdir(filepath.Join(dir, "bin"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bin", "cpio"), []byte("#!/bin/sh\n: >\"$HOME/cpio-used\"\nexec /usr/bin/cpio --no-absolute-filenames \"$@\"\n"), 0o755))
	scratch := filepath.Join(dir, "scratch")
	require.NoError(t, os.Mkdir(scratch, 0o755))
	require.NoError(t, os.Chown(scratch, 65534, 65534))
	return dir, copied
}

// asNobody runs a linter as nobody in dir, and returns what it printed
// and how it exited.
func asNobody(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	scratch := filepath.Join(dir, "scratch")
	cmd := exec.Command("setpriv", append([]string{"--reuid=" + nobody, "--regid=" + nobody, "--clear-groups", "--no-new-privs", "--",
		"env", "PATH=" + filepath.Join(dir, "bin") + ":/usr/bin:/bin", "HOME=" + scratch, "TMPDIR=" + scratch}, args...)...)
	cmd.Dir = scratch
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// findings are the lines of a linter's output that report something, as
// "E: tag ..." or "W: tag ...".
func findings(out string, line *regexp.Regexp) []string {
	var found []string
	for _, l := range strings.Split(out, "\n") {
		if m := line.FindStringSubmatch(l); m != nil {
			found = append(found, m[1])
		}
	}
	return found
}

// lintian finds nothing in the .debs, at its default level: what the
// package overrides is in /usr/share/lintian/overrides/bootagent, each
// with its reason.
func TestLintianFindsNothing(t *testing.T) {
	for _, arch := range arches {
		t.Run(arch, func(t *testing.T) {
			dir, deb := lintDir(t, built(t, "deb", arch))
			out, err := asNobody(t, dir, "lintian", "--display-level", ">=warning", "--show-overrides", "--fail-on", "none", deb)
			require.NoError(t, err, "lintian %s:\n%s", deb, out)
			assert.Empty(t, findings(out, regexp.MustCompile(`^([EWX]: .*)`)), "lintian %s:\n%s", deb, out)
			// The overrides matched: lintian unpacked and checked the package.
			assert.Equal(t, []string{"O: bootagent: initial-upload-closes-no-bugs", "O: bootagent: statically-linked-binary"},
				findings(out, regexp.MustCompile(`^(O: bootagent: [a-z-]+)`)), "lintian %s:\n%s", deb, out)
		})
	}
}

// rpmlint finds no error in the .rpms but the missing signature (a release
// step: README, "Releases"), and no warning: packaging/rpmlint.toml holds
// Fedora's settings and the filtered findings, each with its reason.
func TestRpmlintFindsNoErrorButTheSignature(t *testing.T) {
	config, err := filepath.Abs("rpmlint.toml")
	require.NoError(t, err)
	for _, arch := range arches {
		t.Run(arch, func(t *testing.T) {
			dir, rpm := lintDir(t, built(t, "rpm", arch))
			data, err := os.ReadFile(config)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(dir, "rpmlint.toml"), data, 0o644))
			out, _ := asNobody(t, dir, "rpmlint", "--config", filepath.Join(dir, "rpmlint.toml"), rpm)
			assert.Equal(t, []string{"E: no-signature"}, findings(out, regexp.MustCompile(`^bootagent\.\w+: ([EW]: \S+)`)), "rpmlint %s:\n%s", rpm, out)
			assert.Contains(t, out, "1 packages and 0 specfiles checked", "rpmlint ran to its end:\n%s", out)
			assert.FileExists(t, filepath.Join(dir, "scratch", "cpio-used"), "rpmlint unpacked the package with the cpio that keeps names relative")
			// Unfiltered, rpmlint sees the binary it unpacked.
			bare, _ := asNobody(t, dir, "rpmlint", rpm)
			assert.Contains(t, bare, "E: statically-linked-binary /usr/bin/bootagent", "rpmlint read the unpacked files:\n%s", bare)
		})
	}
}
