package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/bootagent/bootagent/internal/testenv"
)

var sinceStartRE = regexp.MustCompile(`"since_start": "([^"]+)"`)

// BenchmarkOnceProcess runs the built binary, `bootagent once`, against the
// IMDS emulator on loopback, from a fresh root and kernel name each time. It
// reports the whole process time per run (ns/op) and, from the agent's own
// log, the time from its start to the host name applied, median and worst.
func BenchmarkOnceProcess(b *testing.B) {
	testenv.RequirePrivateUTS(b)
	bin := testenv.Tool(b, "bootagent")
	emu := testenv.StartIMDS(b, testenv.IMDSConfig{UserData: []byte("hostname=bench01\ndomain=example.internal\n")})
	dir := b.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfg, []byte("imds:\n  endpoint: "+emu.URL+"\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	root := filepath.Join(dir, "root")
	hosts := []byte("127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n")

	var toHostname []time.Duration
	for b.Loop() {
		b.StopTimer()
		if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "etc/hosts"), hosts, 0o644); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("debian\n"), 0o644); err != nil {
			b.Fatal(err)
		}
		if err := syscall.Sethostname([]byte("localhost")); err != nil {
			b.Fatal(err)
		}
		var stderr bytes.Buffer
		cmd := exec.Command(bin, "once", "--config", cfg, "--root", root)
		cmd.Stderr = &stderr
		b.StartTimer()

		if err := cmd.Run(); err != nil {
			b.Fatalf("bootagent once: %v\n%s", err, stderr.String())
		}

		b.StopTimer()
		m := sinceStartRE.FindSubmatch(stderr.Bytes())
		if m == nil {
			b.Fatalf("no since_start in the log:\n%s", stderr.String())
		}
		d, err := time.ParseDuration(string(m[1]))
		if err != nil {
			b.Fatal(err)
		}
		toHostname = append(toHostname, d)
		b.StartTimer()
	}
	slices.Sort(toHostname)
	b.ReportMetric(float64(toHostname[len(toHostname)/2])/float64(time.Millisecond), "ms-to-hostname-p50")
	b.ReportMetric(float64(toHostname[len(toHostname)-1])/float64(time.Millisecond), "ms-to-hostname-max")
}
