package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bootagent/bootagent/internal/testenv"
)

// BenchmarkBoot boots the image once (a first boot: name, key, registration,
// first run) and reports, from the journal's own clock, the time from
// systemd starting the unit to the host name applied and to READY (the
// agent's own work: key and registration included), and, separately, the
// Ruby chef-client stand-in's first run as the agent times it (its unit
// started, Ruby and Chef's libraries loaded, Ohai, the cookbooks'
// download, the node saved); then it watches the agent idle for BOOTAGENT_BENCH_IDLE (10m
// by default) and reports its peak and idle memory (VmHWM, VmRSS) and its
// CPU time.
func BenchmarkBoot(b *testing.B) {
	idle := 10 * time.Minute
	if v := os.Getenv("BOOTAGENT_BENCH_IDLE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatalf("BOOTAGENT_BENCH_IDLE: %v", err)
		}
		idle = d
	}
	for b.Loop() {
		img := newImage(b)
		img.instance("i-0be0c0000000000001", userData)
		m := img.boot()
		var st struct {
			Phase   string `json:"phase"`
			LastRun *struct {
				Duration time.Duration `json:"duration"`
			} `json:"last_run"`
		}
		testenv.Eventually(b, 60*time.Second, func() bool {
			data, _ := readIfExists(img.path("/var/lib/bootagent/state.json"))
			return json.Unmarshal([]byte(data), &st) == nil && st.Phase == "idle" && st.LastRun != nil
		}, "the first boot completes")

		starting, started, hostname := bootTimes(b, m)
		b.ReportMetric(float64(hostname-starting)/1000, "ms-unit-start-to-hostname")
		b.ReportMetric(float64(started-starting)/1000, "ms-unit-start-to-ready")
		b.ReportMetric(float64(st.LastRun.Duration.Microseconds())/1000, "ms-standin-first-run")

		pid := strings.TrimSpace(m.sh("systemctl", "show", "-p", "MainPID", "--value", "bootagent.service"))
		cpuBefore := cpuTicks(b, m, pid)
		time.Sleep(idle) // The idle period being measured.
		cpuAfter := cpuTicks(b, m, pid)
		status := m.sh("cat", "/proc/"+pid+"/status")
		b.ReportMetric(kib(b, status, "VmHWM")/1024, "MiB-peak-rss")
		b.ReportMetric(kib(b, status, "VmRSS")/1024, "MiB-idle-rss")
		// Clock ticks are 1/100 s on Linux.
		b.ReportMetric(float64(cpuAfter-cpuBefore)*10/idle.Minutes(), "cpu-ms-per-idle-min")
		b.ReportMetric(idle.Seconds(), "idle-s")
		m.poweroff()
	}
}

// bootTimes returns, in the journal's monotonic microseconds, when systemd
// began starting the unit, when the unit became active (READY=1), and when
// the agent logged the host name applied.
func bootTimes(b *testing.B, m *machine) (starting, started, hostname int64) {
	out := m.sh("journalctl", "-b", "-u", "bootagent.service", "-o", "json", "--no-pager")
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var e map[string]any
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			b.Fatal(err)
		}
		msg, _ := e["MESSAGE"].(string)
		ts, _ := strconv.ParseInt(fmt.Sprint(e["__MONOTONIC_TIMESTAMP"]), 10, 64)
		switch {
		case strings.HasPrefix(msg, "Starting bootagent.service") && starting == 0:
			starting = ts
		case strings.HasPrefix(msg, "Started bootagent.service") && started == 0:
			started = ts
		case msg == "hostname applied" && hostname == 0:
			hostname = ts
		}
	}
	if starting == 0 || started == 0 || hostname == 0 {
		b.Fatalf("the journal lacks the unit's start, READY or the host name:\n%s", out)
	}
	return starting, started, hostname
}

func cpuTicks(b *testing.B, m *machine, pid string) int64 {
	fields := strings.Fields(m.sh("cat", "/proc/"+pid+"/stat"))
	utime, err1 := strconv.ParseInt(fields[13], 10, 64)
	stime, err2 := strconv.ParseInt(fields[14], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("read CPU time of %s: %v %v", pid, err1, err2)
	}
	return utime + stime
}

func kib(b *testing.B, status, field string) float64 {
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatalf("no %s in /proc status", field)
	return 0
}
