// Package packaging holds the units, the default config, the nfpm
// definition and the maintainer scripts; its tests read the packages `make
// deb rpm` built from them.
package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// built returns the one package of kind ("deb" or "rpm") in the dist
// directory `make test` names in BOOTAGENT_DIST.
func built(t *testing.T, kind string) string {
	t.Helper()
	dist := os.Getenv("BOOTAGENT_DIST")
	if dist == "" {
		t.Fatal("BOOTAGENT_DIST is not set; `make test` builds the packages and sets it")
	}
	matches, err := filepath.Glob(filepath.Join(dist, "*."+kind))
	require.NoError(t, err)
	require.Len(t, matches, 1, "one .%s in %s (run `make clean deb rpm`)", kind, dist)
	return matches[0]
}

func output(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %v: %s", name, args, out)
	return string(out)
}

var wantFiles = []string{
	"/usr/bin/bootagent",
	"/usr/lib/systemd/system/bootagent.service",
	"/usr/lib/systemd/system/bootagent.path",
	"/usr/lib/systemd/system/bootagent-restart.service",
	"/etc/bootagent/config.yaml",
	"/usr/share/doc/bootagent/README.md",
	"/var/lib/bootagent",
}

func TestTheDebCarriesTheAgentUnitsAndConfig(t *testing.T) {
	deb := built(t, "deb")
	listing := output(t, "dpkg-deb", "-c", deb)
	for _, f := range wantFiles {
		assert.Contains(t, listing, " ."+f, "dpkg-deb -c lists %s", f)
	}
	assert.Regexp(t, `-rwxr-xr-x root/root +\d+ .* \./usr/bin/bootagent`, listing)

	control := t.TempDir()
	output(t, "dpkg-deb", "-e", deb, control)
	conffiles, err := os.ReadFile(filepath.Join(control, "conffiles"))
	require.NoError(t, err)
	assert.Equal(t, "/etc/bootagent/config.yaml\n", string(conffiles), "the config survives upgrades")
	for _, script := range []string{"postinst", "prerm", "postrm"} {
		out, err := exec.Command("sh", "-n", filepath.Join(control, script)).CombinedOutput()
		require.NoError(t, err, "maintainer script %s is missing or not valid sh: %s", script, out)
	}
	postinst, _ := os.ReadFile(filepath.Join(control, "postinst"))
	assert.Contains(t, string(postinst), "systemctl enable bootagent.service bootagent.path")
	assert.NotContains(t, string(postinst), "systemctl start", "installing on a build machine must not register it")
	prerm, _ := os.ReadFile(filepath.Join(control, "prerm"))
	assert.Contains(t, string(prerm), "systemctl stop bootagent.path bootagent.service")
}

func TestTheRpmCarriesTheSameFiles(t *testing.T) {
	rpm := built(t, "rpm")
	listing := output(t, "rpm", "-qlp", rpm)
	for _, f := range wantFiles {
		assert.Contains(t, strings.Split(strings.TrimSpace(listing), "\n"), f)
	}
	assert.Equal(t, "/etc/bootagent/config.yaml\n", output(t, "rpm", "-qp", "--configfiles", rpm))
	scripts := output(t, "rpm", "-qp", "--scripts", rpm)
	assert.Contains(t, scripts, "postinstall scriptlet")
	assert.Contains(t, scripts, "preuninstall scriptlet")
}

// commentedAbove reports whether the group of directives line i belongs to
// starts with a comment.
func commentedAbove(lines []string, i int) bool {
	for j := i - 1; j >= 0 && strings.TrimSpace(lines[j]) != ""; j-- {
		if strings.HasPrefix(lines[j], "#") {
			return true
		}
	}
	return false
}

// Every non-obvious line of a unit carries a comment saying why; this keeps
// the directives that matter explained.
func TestUnitDirectivesAreExplained(t *testing.T) {
	unit, err := os.ReadFile("systemd/bootagent.service")
	require.NoError(t, err)
	for _, directive := range []string{"After=network-online.target", "Type=notify", "RestartPreventExitStatus=2", "WatchdogSec=", "KillMode=process", "TimeoutStartSec="} {
		lines := strings.Split(string(unit), "\n")
		found := false
		for i, l := range lines {
			if strings.HasPrefix(l, directive) {
				found = true
				assert.True(t, commentedAbove(lines, i), "%s has a comment above it", directive)
			}
		}
		assert.True(t, found, "bootagent.service sets %s", directive)
	}
}
