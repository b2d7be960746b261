// Package e2e boots a real systemd (Debian bookworm, with systemd-nspawn)
// with bootagent installed from its own .deb, goiardi from Debian, and the
// AWS IMDS emulator as a unit on the container's own loopback, and checks
// the agent the way an operator would: systemctl, hostnamectl, journalctl,
// the Chef server's own answers.
package e2e

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bootagent/bootagent/internal/testenv"
)

// image is a copy of the cached Debian image, prepared for one test.
type image struct {
	t    testing.TB
	root string
}

// newImage copies the cached base image (BOOTAGENT_E2E_IMAGE, built by
// `make e2e-image`) and installs the agent's .deb and the test harness in
// it: the IMDS emulator, goiardi's validator put where an image bakes it,
// the tests' chef-repo uploaded to goiardi before the agent starts, the
// chef-client stand-in built on Chef's own Ruby libraries, the knife
// stand-in, and the agent's baked config.
func newImage(t testing.TB) *image {
	t.Helper()
	base := os.Getenv("BOOTAGENT_E2E_IMAGE")
	if base == "" {
		t.Fatal("BOOTAGENT_E2E_IMAGE is not set; `make test` builds the image and sets it")
	}
	return newImageFrom(t, base)
}

// newImageFrom is newImage from another cached image (base).
func newImageFrom(t testing.TB, base string) *image {
	t.Helper()
	testenv.RequirePrivateNetwork(t)
	dist := os.Getenv("BOOTAGENT_DIST")
	debs, _ := filepath.Glob(filepath.Join(dist, "*_"+runtime.GOARCH+".deb"))
	if len(debs) != 1 {
		t.Fatalf("want one %s .deb in BOOTAGENT_DIST=%q, found %v; `make test` builds it", runtime.GOARCH, dist, debs)
	}
	img := &image{t: t, root: filepath.Join(t.TempDir(), "root")}
	run(t, "cp", "-a", base, img.root)

	img.copy(debs[0], "/root/bootagent.deb", 0o644)
	img.nspawn("dpkg", "-i", "/root/bootagent.deb")
	for _, tool := range []string{"ec2-metadata-mock", "chefclient-ruby-standin", "knife-standin"} {
		img.copy(testenv.Tool(t, tool), "/usr/local/bin/"+tool, 0o755)
	}
	run(t, "cp", "-a", testenv.ChefRepo(), img.path("/srv/chef-repo"))
	img.write("/etc/systemd/system/aemm.service", `[Unit]
Description=AWS IMDS emulator (test harness: on EC2, IMDS is there before boot)
Before=bootagent.service
[Service]
Environment=HOME=/var/lib/aemm
StateDirectory=aemm
WorkingDirectory=/var/lib/aemm
# Every mock, with the termination, spot and rebalance notices put off by a
# day (the emulator announces them at once by default).
ExecStart=/usr/local/bin/ec2-metadata-mock -n 127.0.0.1 -p 1338 -I -c /etc/aemm/config.json -d 86400 --asg-termination-delay-sec 86400 --rebalance-delay-sec 86400
# Started only once it answers, as IMDS is before an instance boots.
ExecStartPost=/bin/bash -c 'until echo > /dev/tcp/127.0.0.1/1338; do sleep 0.02; done 2>/dev/null'
[Install]
WantedBy=multi-user.target
`)
	img.write("/etc/systemd/system/e2e-validator.service", `[Unit]
Description=Put goiardi's validator where an image bakes it, and the organisation's chef-repo on goiardi (test harness)
After=goiardi.service
Wants=goiardi.service
Before=bootagent.service
[Service]
Type=oneshot
ExecStart=/bin/bash -c 'until [ -s /etc/goiardi/chef-validator.pem ]; do sleep 0.05; done; until echo > /dev/tcp/127.0.0.1/4545; do sleep 0.05; done 2>/dev/null; install -D -m 0600 /etc/goiardi/chef-validator.pem /etc/chef/validation.pem'
ExecStart=/usr/local/bin/knife-standin -s http://127.0.0.1:4545 -u admin -k /etc/goiardi/admin.pem upload /srv/chef-repo
[Install]
WantedBy=multi-user.target
`)
	img.write("/etc/systemd/system/bootagent.service.d/e2e.conf", "[Unit]\nAfter=aemm.service e2e-validator.service\n")
	for _, unit := range []string{"aemm.service", "e2e-validator.service"} {
		if err := os.Symlink("/etc/systemd/system/"+unit, filepath.Join(img.root, "etc/systemd/system/multi-user.target.wants", unit)); err != nil {
			t.Fatal(err)
		}
	}
	// goiardi keeps its data on disk every second, so that nodes outlive
	// a reboot of the container, and names itself by the address it
	// listens on in the cookbook file URLs it hands out (by default, the
	// host name at its start, which resolves to 127.0.1.1).
	conf := img.read("/etc/goiardi/goiardi.conf")
	conf = strings.Replace(conf, "freeze-interval = 120", "freeze-interval = 1", 1)
	img.write("/etc/goiardi/goiardi.conf", strings.Replace(conf, `#hostname = "chef.local"`, `hostname = "127.0.0.1"`, 1))
	img.write("/etc/bootagent/config.yaml", `imds:
  endpoint: http://127.0.0.1:1338
  allow_users: [root]
chef:
  server_url: http://127.0.0.1:4545
  node_name: "{hostname}-{instance_id}"
  client_command: [/usr/local/bin/chefclient-ruby-standin, --record, /var/log/standin.jsonl, --sleep-file, /etc/standin-sleep]
  license: accept
  license_key_file: /etc/chef/license.key
metrics:
  textfile: /var/lib/prometheus/node-exporter/bootagent.prom
`)
	// node_exporter's textfile directory, as its package makes it.
	if err := os.MkdirAll(img.path("/var/lib/prometheus/node-exporter"), 0o755); err != nil {
		t.Fatal(err)
	}
	img.write("/etc/chef/license.key", licenseKey+"\n")
	if err := os.Chmod(img.path("/etc/chef/license.key"), 0o600); err != nil {
		t.Fatal(err)
	}
	return img
}

// instance sets what the emulator serves: the instance ID and user-data.
func (img *image) instance(id, userData string) {
	doc, err := json.Marshal(map[string]any{
		"userdata": map[string]any{"values": map[string]any{"userdata": base64.StdEncoding.EncodeToString([]byte(userData))}},
		"metadata": map[string]any{"values": map[string]any{"instance-id": id, "local-hostname": "ip-10-0-0-1.eu-west-1.compute.internal"}},
		"dynamic": map[string]any{"values": map[string]any{"instance-identity-document": map[string]any{
			"instanceId": id, "region": "eu-west-1", "availabilityZone": "eu-west-1a", "accountId": "123456789012",
		}}},
	})
	if err != nil {
		img.t.Fatal(err)
	}
	img.write("/etc/aemm/config.json", string(doc))
}

func (img *image) path(p string) string { return filepath.Join(img.root, p) }

func (img *image) write(p, content string) {
	img.t.Helper()
	if err := os.MkdirAll(filepath.Dir(img.path(p)), 0o755); err != nil {
		img.t.Fatal(err)
	}
	if err := os.WriteFile(img.path(p), []byte(content), 0o644); err != nil {
		img.t.Fatal(err)
	}
}

func (img *image) read(p string) string {
	img.t.Helper()
	b, err := os.ReadFile(img.path(p))
	if err != nil {
		img.t.Fatal(err)
	}
	return string(b)
}

func (img *image) copy(src, dst string, mode os.FileMode) {
	img.t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		img.t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(img.path(dst)), 0o755); err != nil {
		img.t.Fatal(err)
	}
	if err := os.WriteFile(img.path(dst), data, mode); err != nil {
		img.t.Fatal(err)
	}
}

// nspawn runs one command in the image without booting it.
func (img *image) nspawn(args ...string) string {
	img.t.Helper()
	return run(img.t, "timeout", append([]string{"120", "systemd-nspawn", "-q", "-D", img.root, "--register=no", "--keep-unit", "--private-network"}, args...)...)
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// machine is the image booted: systemd as PID 1 of its own namespaces,
// loopback its only network.
type machine struct {
	t      testing.TB
	cmd    *exec.Cmd
	leader int
	mu     sync.Mutex
	out    bytes.Buffer
	exited chan struct{}
}

func (m *machine) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.out.Write(p)
}

// licenseKey is the Chef license key the image carries for chef-client.
const licenseKey = "e2e-license-key-0001"

// bootTimeout bounds a whole boot of the container, checks included.
const bootTimeout = "300"

// boot starts the image with systemd and waits until the system is up.
func (img *image) boot() *machine {
	t := img.t
	t.Helper()
	m := &machine{t: t, exited: make(chan struct{})}
	m.cmd = exec.Command("timeout", "--kill-after=10", bootTimeout, "systemd-nspawn", "-q", "-D", img.root, "-b",
		"--private-network", "--register=no", "--keep-unit")
	m.cmd.Stdout, m.cmd.Stderr = m, m
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("boot: %v", err)
	}
	go func() { _ = m.cmd.Wait(); close(m.exited) }()
	t.Cleanup(func() {
		select {
		case <-m.exited:
			return
		default:
		}
		_ = m.cmd.Process.Kill()
		<-m.exited
	})
	testenv.Eventually(t, 30*time.Second, func() bool {
		m.leader = containerInit(m.cmd.Process.Pid)
		return m.leader != 0
	}, "systemd starts in the container")
	var state string
	testenv.Eventually(t, 90*time.Second, func() bool {
		state, _ = m.try("systemctl", "is-system-running")
		state = strings.TrimSpace(state)
		return state == "running" || state == "degraded"
	}, "the container boots (is-system-running: %s)", state)
	return m
}

// containerInit finds systemd in the container: the child of
// systemd-nspawn, itself the child of timeout.
func containerInit(timeoutPID int) int {
	for _, nspawn := range children(timeoutPID) {
		for _, c := range children(nspawn) {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", c)); strings.TrimSpace(string(comm)) == "systemd" {
				return c
			}
		}
	}
	return 0
}

func children(pid int) []int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(data)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// try runs a command inside the running container.
func (m *machine) try(args ...string) (string, error) {
	out, err := exec.Command("nsenter", append([]string{"-t", strconv.Itoa(m.leader), "-a", "--"}, args...)...).CombinedOutput()
	return string(out), err
}

// sh runs a command inside the container and fails the test if it fails.
func (m *machine) sh(args ...string) string {
	m.t.Helper()
	out, err := m.try(args...)
	if err != nil {
		m.t.Fatalf("in the container: %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// show returns a unit's properties.
func (m *machine) show(unit string, props ...string) map[string]string {
	m.t.Helper()
	args := []string{"systemctl", "show", unit}
	for _, p := range props {
		args = append(args, "-p", p)
	}
	out := map[string]string{}
	for _, line := range strings.Split(m.sh(args...), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			out[k] = v
		}
	}
	return out
}

// poweroff shuts the container down and waits for it to be gone.
func (m *machine) poweroff() {
	m.t.Helper()
	_, _ = m.try("systemctl", "poweroff")
	select {
	case <-m.exited:
	case <-time.After(60 * time.Second):
		m.t.Fatalf("the container did not power off:\n%s", m.output())
	}
}

func (m *machine) output() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.out.String()
}
