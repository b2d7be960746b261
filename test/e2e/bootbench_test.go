package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bootagent/bootagent/internal/testenv"
)

// hostwatch polls the kernel host name every millisecond from early in the
// boot, without forking (a read with a timeout on a pipe it holds both
// ends of is its sleep), and records when the name becomes the one the
// user-data gives: the same clock for every agent, not their own logs.
const hostwatch = `#!/bin/bash
exec {tick}<> <(:)
until read -r h < /proc/sys/kernel/hostname; [[ $h == web01* ]]; do
	read -t 0.001 -u "$tick" || true
done
echo "$EPOCHREALTIME" > /run/hostwatch
`

// datedFront answers IMDS's dated API paths (/2009-04-04/...) from the
// emulator's /latest/ ones, for cloud-init.
const datedFront = `import http.server, urllib.error, urllib.request
class Front(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        path = "/latest/" + self.path.split("/", 2)[2] if self.path.startswith("/2009-04-04/") else self.path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "PUT" else None
        headers = {k: v for k, v in self.headers.items() if k.lower().startswith("x-aws-ec2-metadata-token")}
        req = urllib.request.Request("http://127.0.0.1:1338" + path, data=body, headers=headers, method=self.command)
        try:
            res = urllib.request.urlopen(req, timeout=5)
        except urllib.error.HTTPError as e:
            res = e
        data = res.read()
        self.send_response(res.status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    do_GET = do_PUT = answer
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 1339), Front).serve_forever()
`

// floor is the least an agent can do: a token, the user-data, hostname.
const floor = `#!/bin/bash
imds=http://127.0.0.1:1338
token=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' $imds/latest/api/token)
name=$(curl -fsS -H "X-aws-ec2-metadata-token: $token" $imds/latest/user-data | sed -n 's/^fqdn: //p')
hostname "$name"
`

// bootVariant is one agent the side-by-side benchmark boots: how its image
// is prepared, and the unit whose start its times are taken from.
type bootVariant struct {
	name string
	unit string
	// units are the variant's units, for a failure to show.
	units   []string
	prepare func(img *image)
}

var bootVariants = []bootVariant{
	{name: "cloud-init (Debian)", unit: "cloud-init-local.service", units: []string{"imds-dated.service", "cloud-init.service"}, prepare: func(img *image) {
		img.disableAgent()
		// The Ec2 datasource, pointed at the emulator; ds-identify would
		// find no EC2 in a container, so it is told to run anyway.
		img.write("/etc/cloud/cloud.cfg.d/90-bench.cfg", `datasource_list: [Ec2, None]
datasource:
  Ec2:
    metadata_urls: ["http://127.0.0.1:1339"]
    strict_id: false
    timeout: 5
    max_wait: 30
`)
		img.write("/etc/cloud/ds-identify.cfg", "policy: enabled\n")
		// Off EC2's hardware cloud-init asks without a token (IMDSv1),
		// so the emulator takes both, and crawls the whole tree, where a
		// notice put off answers 404 and fails the crawl, so none is;
		// and it asks for the 2009-04-04 API, which the emulator does not
		// serve (it serves latest): a front on 1339 maps one to the other.
		img.write("/etc/systemd/system/aemm.service.d/cloud-init.conf", "[Service]\nExecStart=\n"+
			"ExecStart=/usr/local/bin/ec2-metadata-mock -n 127.0.0.1 -p 1338 -c /etc/aemm/config.json\n")
		img.write("/usr/local/bin/imds-dated", datedFront)
		img.write("/etc/systemd/system/imds-dated.service", `[Unit]
Description=bench: IMDS's 2009-04-04 API over the emulator's latest
DefaultDependencies=no
After=aemm.service
Before=sysinit.target cloud-init-local.service cloud-init.service
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/imds-dated
ExecStartPost=/bin/bash -c 'until echo > /dev/tcp/127.0.0.1/1339; do sleep 0.02; done 2>/dev/null'
[Install]
WantedBy=multi-user.target
`)
		img.enable("imds-dated.service", "multi-user.target")
	}},
	{name: "shell oneshot (the floor)", unit: "floor.service", units: []string{"floor.service"}, prepare: func(img *image) {
		img.disableAgent()
		img.disableCloudInit()
		img.write("/usr/local/bin/floor", floor)
		if err := os.Chmod(img.path("/usr/local/bin/floor"), 0o755); err != nil {
			img.t.Fatal(err)
		}
		img.write("/etc/systemd/system/floor.service", `[Unit]
Description=bench: the shell floor
After=aemm.service
[Service]
Type=oneshot
ExecStart=/usr/local/bin/floor
[Install]
WantedBy=multi-user.target
`)
		img.enable("floor.service", "multi-user.target")
	}},
	{name: "bootagent (.deb)", unit: "bootagent.service", units: []string{"bootagent.service"}, prepare: func(img *image) {
		img.disableCloudInit()
		// The name only, and the agent ordered after IMDS alone, as on
		// EC2: the boot test's drop-in and its validator unit (ordered
		// before the agent) wait for goiardi.
		img.write("/etc/bootagent/config.yaml", "imds:\n  endpoint: http://127.0.0.1:1338\n")
		img.write("/etc/systemd/system/bootagent.service.d/e2e.conf", "[Unit]\nAfter=aemm.service\n")
		if err := os.Remove(img.path("/etc/systemd/system/multi-user.target.wants/e2e-validator.service")); err != nil {
			img.t.Fatal(err)
		}
	}},
	{name: registering, unit: "bootagent.service", units: []string{"bootagent.service"}, prepare: func(img *image) {
		img.disableCloudInit()
		// Registration with goiardi, no chef-client run: READY is the
		// agent's own work. The agent starts once goiardi answers and
		// the validator is in place, so its boot times are the
		// harness's, not the agent's.
		img.write("/etc/bootagent/config.yaml", img.read("/etc/bootagent/config.yaml")+"  exec: false\n")
	}},
}

// registering names the variant that registers with goiardi.
const registering = "bootagent (.deb), registering with goiardi"

func (img *image) disableAgent() {
	for _, l := range []string{"multi-user.target.wants/bootagent.service", "multi-user.target.wants/bootagent.path"} {
		if err := os.Remove(img.path("/etc/systemd/system/" + l)); err != nil {
			img.t.Fatal(err)
		}
	}
}

func (img *image) disableCloudInit() { img.write("/etc/cloud/cloud-init.disabled", "") }

func (img *image) enable(unit, target string) {
	if err := os.Symlink("/etc/systemd/system/"+unit, img.path("/etc/systemd/system/"+target+".wants/"+unit)); err != nil {
		img.t.Fatal(err)
	}
}

// bootTiming is what one boot of a variant measured, in milliseconds.
type bootTiming struct {
	bootToName, unitToName, unitToReady, rssMiB float64
}

// BenchmarkBootSideBySide boots the bench image (BOOTAGENT_BENCH_IMAGE,
// built by `make bench-boot` with cloud-init and curl) with each variant in
// turn, BOOTAGENT_BENCH_BOOTS times (5), interleaved, each a first boot of
// a fresh copy, and prints the table: boot to host name and the agent's
// unit start to host name, by the watcher; for bootagent also unit start
// to READY and peak RSS, naming the instance only and, apart, registering
// with goiardi (key made).
func BenchmarkBootSideBySide(b *testing.B) {
	base := os.Getenv("BOOTAGENT_BENCH_IMAGE")
	if base == "" {
		b.Skip("BOOTAGENT_BENCH_IMAGE is not set: `make bench-boot` builds the image with cloud-init and runs this")
	}
	boots := 5
	if v := os.Getenv("BOOTAGENT_BENCH_BOOTS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("BOOTAGENT_BENCH_BOOTS=%q: want a count", v)
		}
		boots = n
	}
	results := map[string][]bootTiming{}
	for b.Loop() {
		for range boots {
			for _, v := range bootVariants {
				results[v.name] = append(results[v.name], bootOnce(b, base, v))
			}
		}
	}
	fmt.Printf("\n%d boots each, interleaved; ms from systemd's start (boot) or the agent's first unit's start (unit); median (min..max)\n\n", boots)
	fmt.Println("| agent | boot → hostname | unit start → hostname | unit start → READY | peak RSS |")
	fmt.Println("| --- | --- | --- | --- | --- |")
	for _, v := range bootVariants {
		r := results[v.name]
		col := func(f func(bootTiming) float64) string { return column("%.0f", r, f) }
		rss := column("%.1f", r, func(t bootTiming) float64 { return t.rssMiB })
		if rss != "—" {
			rss = strings.Replace(rss, " (", " MiB (", 1)
		}
		fmt.Printf("| %s | %s | %s | %s | %s |\n", v.name, col(func(t bootTiming) float64 { return t.bootToName }),
			col(func(t bootTiming) float64 { return t.unitToName }), col(func(t bootTiming) float64 { return t.unitToReady }), rss)
	}
	fmt.Printf("\n(%s: the agent starts once goiardi answers, so only its unit start → READY is the agent's.)\n", registering)
	agent := results[bootVariants[2].name]
	b.ReportMetric(median(agent, func(t bootTiming) float64 { return t.bootToName }), "ms-bootagent-boot-to-hostname")
	b.ReportMetric(median(agent, func(t bootTiming) float64 { return t.unitToName }), "ms-bootagent-unit-to-hostname")
	b.ReportMetric(median(agent, func(t bootTiming) float64 { return t.rssMiB }), "MiB-bootagent-peak-rss")
	b.ReportMetric(median(results[registering], func(t bootTiming) float64 { return t.unitToReady }), "ms-bootagent-unit-to-ready-registered")
	b.ReportMetric(median(results[bootVariants[1].name], func(t bootTiming) float64 { return t.bootToName }), "ms-floor-boot-to-hostname")
	b.ReportMetric(median(results[bootVariants[0].name], func(t bootTiming) float64 { return t.bootToName }), "ms-cloud-init-boot-to-hostname")
}

func median(r []bootTiming, f func(bootTiming) float64) float64 {
	xs := make([]float64, 0, len(r))
	for _, t := range r {
		xs = append(xs, f(t))
	}
	slices.Sort(xs)
	return xs[len(xs)/2]
}

// bootOnce boots a fresh copy of base prepared for v, and times it.
func bootOnce(b *testing.B, base string, v bootVariant) bootTiming {
	img := newImageFrom(b, base)
	img.instance("i-0be0c0000000000002", userData)
	img.write("/usr/local/bin/hostwatch", hostwatch)
	if err := os.Chmod(img.path("/usr/local/bin/hostwatch"), 0o755); err != nil {
		b.Fatal(err)
	}
	img.write("/etc/systemd/system/hostwatch.service", `[Unit]
Description=bench: when the kernel host name is set, from early in the boot
DefaultDependencies=no
[Service]
ExecStart=/usr/local/bin/hostwatch
[Install]
WantedBy=sysinit.target
`)
	if err := os.MkdirAll(img.path("/etc/systemd/system/sysinit.target.wants"), 0o755); err != nil {
		b.Fatal(err)
	}
	img.enable("hostwatch.service", "sysinit.target")
	// IMDS is there before an instance boots: the emulator starts before
	// anything else, cloud-init's first stages (ordered before
	// sysinit.target) included.
	img.write("/etc/systemd/system/aemm.service.d/early.conf", "[Unit]\nDefaultDependencies=no\nBefore=sysinit.target cloud-init-local.service cloud-init.service\n")
	v.prepare(img)

	m := img.boot()
	defer m.poweroff()
	var named string
	testenv.Eventually(b, 90*time.Second, func() bool {
		out, err := m.try("cat", "/run/hostwatch")
		named = out
		return err == nil && out != ""
	}, "%s names the instance; journal:\n%s", v.name, testenv.Later(func() string { return journalOf(m, v.units) }))
	at := func(s string) time.Time {
		sec, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
		if err != nil {
			b.Fatalf("hostwatch wrote %q: %v", s, err)
		}
		return time.Unix(0, int64(sec*1e9))
	}
	name := at(named)
	t := bootTiming{
		bootToName: ms(name.Sub(timestamp(b, m, "", "UserspaceTimestamp"))),
		unitToName: ms(name.Sub(timestamp(b, m, v.unit, "InactiveExitTimestamp"))),
	}
	if v.unit == "bootagent.service" {
		// READY, then the peak memory of a first boot.
		testenv.Eventually(b, 60*time.Second, func() bool {
			return m.show(v.unit, "ActiveState")["ActiveState"] == "active"
		}, "bootagent sends READY; journal:\n%s", testenv.Later(func() string { return journalOf(m, v.units) }))
		t.unitToReady = ms(timestamp(b, m, v.unit, "ActiveEnterTimestamp").Sub(timestamp(b, m, v.unit, "InactiveExitTimestamp")))
		pid := m.show(v.unit, "MainPID")["MainPID"]
		t.rssMiB = kib(b, m.sh("cat", filepath.Join("/proc", pid, "status")), "VmHWM") / 1024
	}
	return t
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// timestamp reads a unit's (or, with unit "", the manager's) timestamp
// property to the microsecond.
func timestamp(b *testing.B, m *machine, unit, prop string) time.Time {
	args := []string{"systemctl", "show", "--timestamp=us+utc", "-p", prop, "--value"}
	if unit != "" {
		args = append(args, unit)
	}
	out := strings.TrimSpace(m.sh(args...))
	ts, err := time.Parse("Mon 2006-01-02 15:04:05.000000 MST", out)
	if err != nil {
		b.Fatalf("%s %s: %q: %v", unit, prop, out, err)
	}
	return ts
}

// journalOf is what a failed boot of the benchmark shows: the units' state
// and journal.
func journalOf(m *machine, units []string) string {
	status, _ := m.try(append([]string{"systemctl", "--no-pager", "status", "hostwatch.service"}, units...)...)
	args := []string{"journalctl", "-b", "--no-pager", "-n", "40"}
	for _, u := range units {
		args = append(args, "-u", u)
	}
	out, _ := m.try(args...)
	return status + "\n" + out
}

// column is one cell of the table: the median (min..max) of what f gives
// for the boots, formatted with verb; "—" when no boot gave a figure.
func column(verb string, r []bootTiming, f func(bootTiming) float64) string {
	var xs []float64
	for _, t := range r {
		if x := f(t); x > 0 {
			xs = append(xs, x)
		}
	}
	if len(xs) == 0 {
		return "—"
	}
	slices.Sort(xs)
	return fmt.Sprintf(verb+" ("+verb+".."+verb+")", xs[len(xs)/2], xs[0], xs[len(xs)-1])
}
