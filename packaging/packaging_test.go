// Package packaging holds the units, the default config, the nfpm
// definition and the maintainer scripts; its tests read the packages `make
// deb rpm` built from them.
package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// built returns the package of kind ("deb" or "rpm") for arch (Go's name)
// in the dist directory `make test` names in BOOTAGENT_DIST.
func built(t *testing.T, kind, arch string) string {
	t.Helper()
	dist := os.Getenv("BOOTAGENT_DIST")
	if dist == "" {
		t.Fatal("BOOTAGENT_DIST is not set; `make test` builds the packages and sets it")
	}
	pattern := "*_" + arch + ".deb"
	if kind == "rpm" {
		pattern = "*." + rpmArch[arch] + ".rpm"
	}
	matches, err := filepath.Glob(filepath.Join(dist, pattern))
	require.NoError(t, err)
	require.Len(t, matches, 1, "one %s in %s (run `make clean deb rpm`)", pattern, dist)
	return matches[0]
}

// arches are the architectures the packages are built for, and rpmArch
// their names in rpm.
var (
	arches  = []string{"amd64", "arm64"}
	rpmArch = map[string]string{"amd64": "x86_64", "arm64": "aarch64"}
)

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
	"/usr/lib/systemd/system/bootagent-filter.service",
	"/etc/bootagent/config.yaml",
	"/usr/share/doc/bootagent/README.md",
	"/usr/share/man/man8/bootagent.8.gz",
	"/usr/share/man/man5/bootagent.yaml.5.gz",
	"/var/lib/bootagent",
	"/usr/share/bootagent/monitoring/bootagent.rules.yml",
	"/usr/share/bootagent/monitoring/bootagent.rules.test.yml",
	"/usr/share/bootagent/monitoring/bootagent.dashboard.json",
}

func TestTheDebsCarryTheAgentUnitsConfigAndDocumentation(t *testing.T) {
	for _, arch := range arches {
		t.Run(arch, func(t *testing.T) {
			deb := built(t, "deb", arch)
			listing := output(t, "dpkg-deb", "-c", deb)
			for _, f := range append(wantFiles, "/usr/share/doc/bootagent/copyright", "/usr/share/doc/bootagent/changelog.Debian.gz", "/usr/share/lintian/overrides/bootagent", "/usr/share/doc/bootagent/THIRD-PARTY-NOTICES.gz") {
				assert.Contains(t, listing, " ."+f, "dpkg-deb -c lists %s", f)
			}
			assert.Regexp(t, `-rwxr-xr-x root/root +\d+ .* \./usr/bin/bootagent`, listing)
			assert.Equal(t, arch+"\n", output(t, "dpkg-deb", "-f", deb, "Architecture"))
			assert.Contains(t, output(t, "dpkg-deb", "-f", deb, "Depends"), "init-system-helpers", "the scripts call deb-systemd-helper")

			control := t.TempDir()
			output(t, "dpkg-deb", "-e", deb, control)
			conffiles, err := os.ReadFile(filepath.Join(control, "conffiles"))
			require.NoError(t, err)
			assert.Equal(t, "/etc/bootagent/config.yaml\n", string(conffiles), "the config survives upgrades")
			scripts := map[string]string{}
			for _, script := range []string{"postinst", "prerm", "postrm"} {
				out, err := exec.Command("sh", "-n", filepath.Join(control, script)).CombinedOutput()
				require.NoError(t, err, "maintainer script %s is missing or not valid sh: %s", script, out)
				data, _ := os.ReadFile(filepath.Join(control, script))
				scripts[script] = string(data)
			}
			// debhelper's systemd snippets: enabled on installation, an
			// operator's disable kept, started by nothing but an upgrade.
			assert.Contains(t, scripts["postinst"], `deb-systemd-helper --quiet was-enabled "$unit"`)
			assert.Contains(t, scripts["postinst"], `deb-systemd-helper enable "$unit"`)
			assert.Contains(t, scripts["postinst"], "deb-systemd-invoke try-restart bootagent.service")
			assert.NotRegexp(t, `deb-systemd-invoke (start|restart)`, scripts["postinst"], "installing on a build machine must not register it")
			assert.Contains(t, scripts["prerm"], "deb-systemd-invoke stop bootagent.path bootagent.service")
			assert.Regexp(t, `(?s)deb-systemd-invoke stop bootagent.path bootagent.service.*bootagent filter remove`, scripts["prerm"], "the IMDS filter goes once the agent, which would put it back, is stopped")
			assert.Contains(t, scripts["postrm"], "deb-systemd-helper purge bootagent.service bootagent.path")
			for name, text := range scripts {
				assert.NotRegexp(t, `(?m)^\s*systemctl (enable|disable|start|stop|restart)`, text, "%s leaves the units to deb-systemd-helper and deb-systemd-invoke", name)
			}
		})
	}
}

func TestTheRpmsCarryTheSameFilesMarkedAsFedoraDoes(t *testing.T) {
	for _, arch := range arches {
		t.Run(arch, func(t *testing.T) {
			rpm := built(t, "rpm", arch)
			listing := strings.Split(strings.TrimSpace(output(t, "rpm", "-qlp", rpm)), "\n")
			for _, f := range append(wantFiles, "/usr/share/licenses/bootagent/LICENSE", "/usr/lib/systemd/system-preset/50-bootagent.preset") {
				assert.Contains(t, listing, f)
			}
			assert.Equal(t, "/etc/bootagent/config.yaml\n", output(t, "rpm", "-qp", "--configfiles", rpm))
			assert.Equal(t, "/usr/share/licenses/bootagent/LICENSE\n/usr/share/licenses/bootagent/THIRD-PARTY-NOTICES\n", output(t, "rpm", "-qp", "--licensefiles", rpm))
			assert.ElementsMatch(t, []string{"/usr/share/doc/bootagent/README.md", "/usr/share/man/man5/bootagent.yaml.5.gz", "/usr/share/man/man8/bootagent.8.gz"},
				strings.Fields(output(t, "rpm", "-qp", "--docfiles", rpm)))
			assert.Equal(t, rpmArch[arch]+" System Environment/Daemons Apache-2.0", output(t, "rpm", "-qp", "--qf", "%{ARCH} %{GROUP} %{LICENSE}", rpm))
			assert.Regexp(t, `^\* .* bootagent developers <[^>]+> - \S+-1\n`, output(t, "rpm", "-qp", "--changelog", rpm), "a changelog whose newest entry is this version-release")

			// The scriptlets have the systemd macros' semantics.
			scriptlets := map[string]string{}
			for _, tag := range []string{"POSTIN", "PREUN", "POSTUN"} {
				text := output(t, "rpm", "-qp", "--qf", "%{"+tag+"}", rpm)
				path := filepath.Join(t.TempDir(), tag)
				require.NoError(t, os.WriteFile(path, []byte(text), 0o644))
				out, err := exec.Command("sh", "-n", path).CombinedOutput()
				require.NoError(t, err, "%s scriptlet is not valid sh: %s", tag, out)
				scriptlets[tag] = text
			}
			assert.Contains(t, scriptlets["POSTIN"], `if [ "$1" -eq 1 ]; then`+"\n\tsystemctl --no-reload preset bootagent.service bootagent.path")
			assert.NotRegexp(t, `(?m)^[^#]*\b(start|restart)\b`, scriptlets["POSTIN"], "installing on a build machine must not register it")
			assert.Contains(t, scriptlets["PREUN"], `if [ "$1" -eq 0 ]; then`+"\n\tsystemctl --no-reload disable --now bootagent.path bootagent.service")
			assert.Contains(t, scriptlets["POSTUN"], `if [ "$1" -ge 1 ]; then`+"\n\tsystemctl try-restart bootagent.service")
		})
	}
}

// The .rpm installs with rpm itself into a scratch root: the layout rpm
// makes of it is the one the units and the config expect.
func TestTheRpmInstallsIntoARoot(t *testing.T) {
	rpm := built(t, "rpm", runtime.GOARCH)
	root := t.TempDir()
	output(t, "rpm", "--root", root, "--dbpath", "/var/lib/rpm", "--initdb")
	output(t, "rpm", "--root", root, "--dbpath", "/var/lib/rpm", "-i", "--nodeps", "--noscripts", rpm)
	for _, f := range wantFiles {
		_, err := os.Lstat(filepath.Join(root, f))
		assert.NoError(t, err, "rpm --root put %s in place", f)
	}
	info, err := os.Stat(filepath.Join(root, "usr/bin/bootagent"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o755), info.Mode().Perm())
	version := output(t, filepath.Join(root, "usr/bin/bootagent"), "version")
	assert.Contains(t, version, "bootagent ")
	assert.NotContains(t, version, "unknown", "the version is stamped")
	assert.Equal(t, "bootagent", strings.Fields(output(t, "rpm", "--root", root, "--dbpath", "/var/lib/rpm", "-q", "--qf", "%{NAME} ", "bootagent"))[0])
	unit, err := os.ReadFile(filepath.Join(root, "usr/lib/systemd/system/bootagent.service"))
	require.NoError(t, err)
	assert.Contains(t, string(unit), "ExecStart=/usr/bin/bootagent run")
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
