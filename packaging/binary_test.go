package packaging

import (
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

// shipped is the agent a .deb of arch carries, unpacked.
func shipped(t *testing.T, arch string) string {
	t.Helper()
	dir := t.TempDir()
	output(t, "dpkg-deb", "-x", built(t, "deb", arch), dir)
	return filepath.Join(dir, "usr/bin/bootagent")
}

// The shipped binaries are static: no interpreter, no dynamic section, so
// they run on any glibc an image carries (or none); built without cgo, so
// nothing in the agent needed it (Go's own resolver and user lookup);
// and built with -trimpath, for reproducible builds.
func TestTheShippedBinariesAreStatic(t *testing.T) {
	machine := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}
	for _, arch := range arches {
		t.Run(arch, func(t *testing.T) {
			bin := shipped(t, arch)
			f, err := elf.Open(bin)
			require.NoError(t, err)
			defer func() { _ = f.Close() }()
			assert.Equal(t, machine[arch], f.Machine)
			assert.Equal(t, elf.ET_EXEC, f.Type, "a static executable")
			for _, p := range f.Progs {
				assert.NotEqual(t, elf.PT_INTERP, p.Type, "no program interpreter (dynamic loader)")
				assert.NotEqual(t, elf.PT_DYNAMIC, p.Type, "no dynamic section")
			}
			assert.Nil(t, f.Section(".dynamic"))
			libs, err := f.ImportedLibraries()
			require.NoError(t, err)
			assert.Empty(t, libs)

			info, err := buildinfo.ReadFile(bin)
			require.NoError(t, err)
			settings := map[string]string{}
			for _, s := range info.Settings {
				settings[s.Key] = s.Value
			}
			assert.Equal(t, "0", settings["CGO_ENABLED"], "built without cgo")
			assert.Equal(t, "true", settings["-trimpath"])
			assert.Equal(t, "linux", settings["GOOS"])
			assert.Equal(t, arch, settings["GOARCH"])
		})
	}
}

// readmeUserData are the user-data examples of the README's reference, in
// each form.
func readmeUserData(t *testing.T) map[string]string {
	t.Helper()
	data, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	examples := map[string]string{}
	for _, m := range regexp.MustCompile("(?ms)^```[a-z]*\n(.*?)^```\n").FindAllStringSubmatch(string(data), -1) {
		block := m[1]
		switch {
		case strings.HasPrefix(block, "#cloud-config"):
			examples["cloud-config"] = block
		case strings.HasPrefix(block, "Content-Type: multipart/"):
			examples["mime"] = strings.ReplaceAll(block, "\n", "\r\n")
		case strings.HasPrefix(block, `{"hostname"`):
			examples["json"] = block
		case strings.Contains(block, "\nhostname=web01\n") && !strings.Contains(block, "$ "):
			examples["key=value"] = block
		}
	}
	require.Len(t, examples, 4, "the README's user-data reference shows each form")
	return examples
}

// The arm64 binary is run, not only built: under Debian's
// qemu-user-static it answers version, checks the README's user-data
// examples, and makes a first boot against AWS's IMDS emulator on
// loopback (the test's network namespace) in a scratch root.
func TestTheArm64BinaryRuns(t *testing.T) {
	testenv.RequirePrivateUTS(t)
	qemu := testenv.Tool(t, "qemu-aarch64-static")
	bin := shipped(t, "arm64")
	run := func(stdin string, args ...string) (string, error) {
		cmd := exec.Command(qemu, append([]string{bin}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	out, err := run("", "version")
	require.NoError(t, err, out)
	assert.Regexp(t, `^bootagent \S+ \(go1\.\d+`, out)
	assert.NotContains(t, out, "unknown", "the version is stamped")

	empty := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(empty, nil, 0o644))
	for form, ud := range readmeUserData(t) {
		out, err := run(ud, "userdata", "check", "--config", empty, "-")
		require.NoError(t, err, "%s: %s", form, out)
		assert.Contains(t, out, "web01.example.internal", "%s: %s", form, out)
	}

	m := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=arm01\ndomain=example.internal\n")})
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	config := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(config, fmt.Appendf(nil, "imds:\n  endpoint: %s\n", m.URL), 0o644))
	out, err = run("", "once", "--config", config, "--root", root)
	require.NoError(t, err, out)
	hostname, err := os.Hostname()
	require.NoError(t, err)
	assert.Equal(t, "arm01.example.internal", hostname, "the arm64 agent set the kernel name")
	hosts, err := os.ReadFile(filepath.Join(root, "etc/hosts"))
	require.NoError(t, err)
	assert.True(t, bytes.Contains(hosts, []byte("arm01.example.internal arm01")), "/etc/hosts:\n%s", hosts)
}

// The notices the .deb carries name Go and every module the shipped
// binary says it is built from, at its version.
func TestTheNoticesNameEveryModuleOfTheBinary(t *testing.T) {
	for _, arch := range arches {
		t.Run(arch, func(t *testing.T) {
			dir := t.TempDir()
			output(t, "dpkg-deb", "-x", built(t, "deb", arch), dir)
			notices := output(t, "zcat", filepath.Join(dir, "usr/share/doc/bootagent/THIRD-PARTY-NOTICES.gz"))
			info, err := buildinfo.ReadFile(filepath.Join(dir, "usr/bin/bootagent"))
			require.NoError(t, err)
			assert.Contains(t, notices, "Go "+strings.TrimPrefix(info.GoVersion, "go")+": the standard library and runtime\n")
			require.NotEmpty(t, info.Deps)
			for _, m := range info.Deps {
				assert.Contains(t, notices, "\n"+m.Path+" "+m.Version+"\n", "the notices of %s", m.Path)
			}
			assert.Contains(t, notices, "Redistribution and use in source and binary forms")
		})
	}
}
