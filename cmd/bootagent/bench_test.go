package main

import (
	"bytes"
	"fmt"
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

// BenchmarkOnceProcess runs the built binary, `bootagent once`, from a fresh
// root and kernel name each time, against the IMDS emulator on loopback:
//
//   - hostname: no Chef; ns/op is the whole process, and the agent's own
//     log gives the time from its start to the host name applied;
//   - full: with goiardi and the chef-client stand-in, a new node each
//     time; ns/op is the whole first boot: key, registration, first run.
func BenchmarkOnceProcess(b *testing.B) {
	testenv.RequirePrivateUTS(b)
	bin := testenv.Tool(b, "bootagent")
	emu := testenv.StartIMDS(b, testenv.IMDSConfig{UserData: []byte("hostname=bench01\ndomain=example.internal\nchef_run_list=role[web]\n")})

	b.Run("hostname", func(b *testing.B) {
		benchOnce(b, bin, func(int) string { return "imds:\n  endpoint: " + emu.URL + "\n" }, nil)
	})
	b.Run("full", func(b *testing.B) {
		g := testenv.StartGoiardi(b)
		standin := testenv.Tool(b, "chefclient-standin")
		config := func(i int) string {
			return fmt.Sprintf("imds:\n  endpoint: %s\nchef:\n  server_url: %s\n  node_name: bench-%d\n  client_command: [%q]\n", emu.URL, g.URL, i, standin)
		}
		benchOnce(b, bin, config, func(root string) { g.PlaceValidator(b, root) })
	})
}

func benchOnce(b *testing.B, bin string, config func(i int) string, prepare func(root string)) {
	dir := b.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	var toHostname []time.Duration
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		root := filepath.Join(dir, fmt.Sprintf("root-%d", i))
		if err := os.MkdirAll(filepath.Join(root, "etc/chef"), 0o755); err != nil {
			b.Fatal(err)
		}
		for name, content := range map[string]string{"etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n", "etc/hostname": "debian\n"} {
			if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
				b.Fatal(err)
			}
		}
		if prepare != nil {
			prepare(root)
		}
		if err := os.WriteFile(cfg, []byte(config(i)), 0o600); err != nil {
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
