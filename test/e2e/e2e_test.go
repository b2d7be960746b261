package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

const userData = `#cloud-config
hostname: web01
fqdn: web01.e2e.internal
chef:
  run_list: ["role[web]", "recipe[base]"]
  environment: _default
`

// standinRuns reads what the chef-client stand-in recorded of each run.
func standinRuns(t *testing.T, img *image) []map[string]any {
	t.Helper()
	data, err := readIfExists(img.path("/var/log/standin.jsonl"))
	require.NoError(t, err)
	var runs []map[string]any
	sc := bufio.NewScanner(strings.NewReader(data))
	for sc.Scan() {
		var r map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
		runs = append(runs, r)
	}
	return runs
}

// knife asks goiardi, inside the container, as its admin.
func knife(m *machine, args ...string) map[string]any {
	m.t.Helper()
	out := m.sh(append([]string{"knife-standin", "-s", "http://127.0.0.1:4545", "-u", "admin", "-k", "/etc/goiardi/admin.pem"}, args...)...)
	var v map[string]any
	require.NoError(m.t, json.Unmarshal([]byte(out), &v), "%s", out)
	return v
}

// agentState is the part of state.json the test reads.
type agentState struct {
	InstanceID   string     `json:"instance_id"`
	Phase        string     `json:"phase"`
	Bootstrapped bool       `json:"bootstrapped"`
	NodeName     string     `json:"node_name"`
	RegisteredAt *time.Time `json:"registered_at"`
	LastRun      *struct {
		ID     string `json:"id"`
		Result string `json:"result"`
	} `json:"last_run"`
}

func state(t *testing.T, img *image) agentState {
	t.Helper()
	var s agentState
	require.NoError(t, json.Unmarshal([]byte(img.read("/var/lib/bootagent/state.json")), &s))
	return s
}

// waitIdle waits until the agent has converged and is idle.
func waitIdle(t *testing.T, m *machine, img *image, runs int) {
	t.Helper()

	testenv.Eventually(t, 60*time.Second, func() bool {
		s := state(t, img)
		return s.Phase == "idle" && len(standinRuns(t, img)) >= runs
	}, "the agent converges (%d runs) and goes idle; journal:\n%s\nchef-client's:\n%s", runs, testenv.Later(func() string { return journal(m) }), testenv.Later(func() string { return runsJournal(m) }))
}

// runsJournal is the end of the chef-client runs' journal.
func runsJournal(m *machine) string {
	out, _ := m.try("journalctl", "-b", "-u", "bootagent-chef-client-*", "--no-pager", "-n", "40")
	return out
}

func journal(m *machine) string {
	out, _ := m.try("journalctl", "-b", "-u", "bootagent", "--no-pager", "-n", "40")
	return out
}

func TestBoot(t *testing.T) {
	img := newImage(t)
	img.instance("i-0e2e0000000000001", userData)

	t.Run("the units pass systemd-analyze verify in the image they are installed in", func(t *testing.T) {
		out := img.nspawn("systemd-analyze", "verify", "/lib/systemd/system/bootagent.service", "/lib/systemd/system/bootagent.path", "/lib/systemd/system/bootagent-restart.service", "/lib/systemd/system/bootagent-filter.service")
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "bootagent") {
				t.Errorf("systemd-analyze verify: %s", line)
			}
		}
	})

	m := img.boot()
	firstNode := "web01-i-0e2e0000000000001"

	t.Run("1: the unit is active after READY and the host carries the user-data FQDN", func(t *testing.T) {
		waitIdle(t, m, img, 1)
		p := m.show("bootagent.service", "ActiveState", "SubState", "StatusText", "Type")
		assert.Equal(t, "active", p["ActiveState"])
		assert.Equal(t, "running", p["SubState"])
		assert.Equal(t, "notify", p["Type"], "active means READY=1 was sent")
		assert.Contains(t, p["StatusText"], "idle, hostname web01.e2e.internal")
		assert.Equal(t, "web01.e2e.internal\n", m.sh("hostnamectl", "--static"))
		assert.Equal(t, "web01.e2e.internal\n", m.sh("hostname", "-f"))
		assert.Contains(t, m.sh("cat", "/etc/hosts"), "127.0.1.1\tweb01.e2e.internal web01\n")
		assert.Contains(t, journal(m), "bootstrapped: READY")
	})

	t.Run("2: goiardi has the node and client, and chef-client ran once in a transient unit", func(t *testing.T) {
		assert.Contains(t, knife(m, "client", "list"), firstNode)
		node := knife(m, "node", "show", firstNode)
		assert.Equal(t, []any{"role[web]", "recipe[base]"}, node["run_list"])
		assert.Equal(t, "web01.e2e.internal", node["fqdn"], "Ohai's fqdn, saved by the stand-in with the node's own key")
		assert.Equal(t, map[string]any{"base": map[string]any{"version": "1.2.0"}}, node["cookbooks"])

		runs := standinRuns(t, img)
		require.Len(t, runs, 1)
		assert.Equal(t, "/etc/chef/first-boot.json", runs[0]["first_boot"])
		agentInvocation := m.show("bootagent.service", "InvocationID")["InvocationID"]
		assert.NotEmpty(t, runs[0]["invocation_id"], "chef-client was started by systemd")
		assert.NotEqual(t, agentInvocation, runs[0]["invocation_id"], "in a unit of its own, not the agent's")
		sum := sha256.Sum256([]byte(licenseKey))
		assert.Equal(t, hex.EncodeToString(sum[:]), runs[0]["license_key_sha256"], "the license key reached the unit's environment (EnvironmentFiles)")
		assert.Contains(t, m.sh("journalctl", "--no-pager", "-u", "bootagent-chef-client-*"), "Starting Chef Infra Client")
		assert.Empty(t, strings.TrimSpace(m.sh("systemctl", "list-units", "--all", "--no-legend", "bootagent-chef-client-*")), "the finished run's unit is removed")
		_, err := m.try("test", "-e", "/etc/chef/validation.pem")
		assert.Error(t, err, "the validator is deleted after registration")
		assert.Equal(t, "600 root\n", m.sh("stat", "-c", "%a %U", "/etc/chef/client.pem"))
	})

	t.Run("2b: chef-client's own view: Ohai sees the name applied, and the run list's cookbooks are in its cache", func(t *testing.T) {
		// ohai prints one JSON list per attribute asked for.
		out := m.sh("ohai", "fqdn", "hostname", "domain")
		var ohai [][]string
		for dec := json.NewDecoder(strings.NewReader(out)); dec.More(); {
			var v []string
			require.NoError(t, dec.Decode(&v), "%s", out)
			ohai = append(ohai, v)
		}
		assert.Equal(t, [][]string{{"web01.e2e.internal"}, {"web01"}, {"e2e.internal"}}, ohai, "ohai fqdn hostname domain")
		for _, f := range []string{"metadata.rb", "attributes/default.rb", "recipes/default.rb", "recipes/web.rb", "templates/default/motd.erb", "files/default/issue.net"} {
			assert.Equal(t, img.read("/srv/chef-repo/cookbooks/base/"+f), img.read("/var/cache/chef/cookbooks/base/"+f), "%s, downloaded with the node's key and its checksum checked", f)
		}
		assert.FileExists(t, img.path("/etc/chef/accepted_licenses/chef_infra_client"), "chef.license: accept reached chef-client")
	})

	t.Run("3: the journal has the agent's structured fields", func(t *testing.T) {
		out := m.sh("journalctl", "--no-pager", "-o", "json", "-u", "bootagent", "NODE_NAME="+firstNode)
		var registered map[string]any
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			var e map[string]any
			require.NoError(t, json.Unmarshal([]byte(line), &e))
			if e["MESSAGE"] == "registered with the Chef server" {
				registered = e
			}
		}
		require.NotNil(t, registered, "journalctl -u bootagent NODE_NAME=%s finds the registration:\n%s", firstNode, out)
		assert.Equal(t, "i-0e2e0000000000001", registered["INSTANCE_ID"])
		assert.Equal(t, "true", registered["CLIENT_CREATED"])
		assert.Equal(t, "bootagent", registered["SYSLOG_IDENTIFIER"])

		// Every line about the instance names it: journalctl
		// INSTANCE_ID=... finds them all.
		all := m.sh("journalctl", "--no-pager", "-o", "json", "-b", "SYSLOG_IDENTIFIER=bootagent")
		identified := false
		for _, line := range strings.Split(strings.TrimSpace(all), "\n") {
			var e map[string]any
			require.NoError(t, json.Unmarshal([]byte(line), &e))
			if e["MESSAGE"] == "instance identified" {
				identified = true
			}
			if identified {
				assert.Equal(t, "i-0e2e0000000000001", e["INSTANCE_ID"], "%q", e["MESSAGE"])
			}
		}
		assert.True(t, identified)

		// No key material in the whole journal of the boot.
		everything := m.sh("journalctl", "--no-pager", "-o", "json", "-b")
		assert.NotContains(t, everything, "PRIVATE KEY")
		assert.NotContains(t, everything, licenseKey, "nor the license key")
		for _, key := range []string{"/etc/goiardi/chef-validator.pem", "/etc/chef/client.pem"} {
			lines := strings.Split(strings.TrimSpace(img.read(key)), "\n")
			require.Greater(t, len(lines), 3)
			assert.NotContains(t, everything, lines[2], "the journal carries a piece of %s", key)
		}
	})

	t.Run("diagnose finds a working instance working, and status shows the boot timeline", func(t *testing.T) {
		out, err := m.try("bootagent", "diagnose")
		require.NoError(t, err, "bootagent diagnose exits 0:\n%s", out)
		for _, want := range []string{"IMDSv1", "disabled: IMDSv2 only", "web01.e2e.internal", "bootagent.service and bootagent.path enabled", "the server accepts /etc/chef/client.pem"} {
			assert.Contains(t, out, want)
		}
		assert.Contains(t, out, "chef.license: accept (client.rb's chef_license)")

		// Without chef.license, CHEF_LICENSE counts where chef-client's
		// unit inherits it from: systemd's own environment.
		img.write("/root/no-license.yaml", strings.Replace(img.read("/etc/bootagent/config.yaml"), "  license: accept\n", "", 1))
		m.sh("systemctl", "set-environment", "CHEF_LICENSE=accept-silent")
		defer m.sh("systemctl", "unset-environment", "CHEF_LICENSE")
		out, _ = m.try("bootagent", "diagnose", "--config", "/root/no-license.yaml")
		assert.Contains(t, out, "CHEF_LICENSE=accept-silent in systemd's environment, which chef-client's unit inherits")

		status := m.sh("bootagent", "status")
		for _, want := range []string{"bootstrapped  true", "  imds", "  hostname", "  register", "last run"} {
			assert.Contains(t, status, want)
		}
	})

	t.Run("the IMDS filter keeps IMDS for root, and the agent puts it back", func(t *testing.T) {
		// In place before the network is configured, and so before the
		// agent, which finds it as it should be.
		monotonic := func(unit, prop string) int64 {
			v, err := strconv.ParseInt(m.show(unit, prop)[prop], 10, 64)
			require.NoError(t, err, "%s %s", unit, prop)
			return v
		}
		filtered := monotonic("bootagent-filter.service", "ExecMainExitTimestampMonotonic")
		assert.Equal(t, "success", m.show("bootagent-filter.service", "Result")["Result"])
		assert.Positive(t, filtered, "bootagent-filter.service ran")
		assert.Less(t, filtered, monotonic("network-pre.target", "ActiveEnterTimestampMonotonic"), "before network-pre.target")
		assert.Less(t, filtered, monotonic("bootagent.service", "ExecMainStartTimestampMonotonic"), "before the agent")
		assert.Contains(t, m.sh("journalctl", "--no-pager", "-b", "-u", "bootagent-filter.service"), "IMDS filtered")
		// The agent checks it silently when it is in place (the drift
		// below shows the check).
		assert.NotContains(t, m.sh("journalctl", "--no-pager", "-b", "-u", "bootagent.service"), "IMDS filtered", "the agent found the table in place")
		m.sh("systemctl", "restart", "bootagent.service")
		assert.Contains(t, tokenAs(m, "65534"), "Connection refused", "a restart opens nothing")

		assert.Contains(t, tokenAs(m, "0"), "HTTP/1.1 200 OK", "root reaches IMDS")
		assert.Contains(t, tokenAs(m, "65534"), "Connection refused", "nobody is refused at once")
		assert.Regexp(t, `imds filter\s+IMDS \(127\.0\.0\.1:1338, 169\.254\.169\.254:80, \[fd00:ec2::254\]:80\) only for root \(0\)`, m.sh("bootagent", "status"))
		assert.Regexp(t, `(?m)^ok\s+IMDS filter\s+.*uid 0 connects, uid 65534 is refused$`, m.sh("bootagent", "diagnose"))

		assert.Contains(t, m.sh("bootagent", "filter", "remove"), "removed nftables table inet bootagent")
		assert.Contains(t, tokenAs(m, "65534"), "200 OK", "open while the table is gone")
		testenv.Eventually(t, 30*time.Second, func() bool { return strings.Contains(tokenAs(m, "65534"), "Connection refused") },
			"the agent puts the table back at its next poll; journal:\n%s", testenv.Later(func() string { return journal(m) }))
		testenv.Eventually(t, 10*time.Second, func() bool { return strings.Contains(journal(m), "the IMDS filter was missing or changed") },
			"the journal says so:\n%s", testenv.Later(func() string { return journal(m) }))
		assert.Contains(t, tokenAs(m, "0"), "HTTP/1.1 200 OK")
	})

	t.Run("the unit is confined: systemd-analyze security rates it 2.8 or lower", func(t *testing.T) {
		out := m.sh("systemd-analyze", "security", "--no-pager", "bootagent.service")
		level := regexp.MustCompile(`Overall exposure level for bootagent\.service: ([0-9.]+)`).FindStringSubmatch(out)
		require.NotNil(t, level, "%s", out)
		exposure, err := strconv.ParseFloat(level[1], 64)
		require.NoError(t, err)
		assert.LessOrEqual(t, exposure, 2.8, "%s", out)
		p := m.show("bootagent.service", "ProtectSystem", "CapabilityBoundingSet", "NoNewPrivileges")
		assert.Equal(t, "strict", p["ProtectSystem"])
		assert.Equal(t, "cap_chown cap_net_admin cap_sys_admin", p["CapabilityBoundingSet"])
		assert.Equal(t, "yes", p["NoNewPrivileges"])
		pid := m.show("bootagent.service", "MainPID")["MainPID"]
		out, err = m.try("nsenter", "-t", pid, "-m", "--", "touch", "/usr/bootagent-was-here")
		assert.Error(t, err)
		assert.Contains(t, out, "Read-only file system", "the agent's view of /usr is read-only")
		m.sh("nsenter", "-t", pid, "-m", "--", "touch", "/var/lib/bootagent/was-here")
		m.sh("rm", "/var/lib/bootagent/was-here")
		assert.Equal(t, "644\n", m.sh("stat", "-c", "%a", "/var/lib/prometheus/node-exporter/bootagent.prom"), "the metrics textfile, through ReadWritePaths, 0644 under UMask=0077")
		assert.Equal(t, "644 root\n", m.sh("stat", "-c", "%a %U", "/etc/hosts"), "a file others read keeps its mode")
	})

	t.Run("4: kill -9 of the agent: systemd restarts it, and it does not register again", func(t *testing.T) {
		before := state(t, img)
		pid := m.show("bootagent.service", "MainPID")["MainPID"]
		m.sh("systemctl", "kill", "--kill-whom=main", "-s", "KILL", "bootagent.service")
		testenv.Eventually(t, 30*time.Second, func() bool {
			p := m.show("bootagent.service", "MainPID", "ActiveState", "NRestarts")
			return p["MainPID"] != pid && p["MainPID"] != "0" && p["ActiveState"] == "active" && p["NRestarts"] == "1"
		}, "systemd restarts the agent")
		after := state(t, img)
		assert.Equal(t, before.RegisteredAt, after.RegisteredAt, "no new registration")
		assert.Contains(t, journal(m), "already registered; registration skipped")
		assert.Len(t, knife(m, "client", "list"), 3, "validator, webui and one node client")
		assert.Len(t, standinRuns(t, img), 1, "a restart does not make a chef-client run")
	})

	t.Run("5: a change to config.yaml restarts the agent through the path unit", func(t *testing.T) {
		pid := m.show("bootagent.service", "MainPID")["MainPID"]
		img.write("/etc/bootagent/config.yaml", img.read("/etc/bootagent/config.yaml")+"# edited\n")
		testenv.Eventually(t, 30*time.Second, func() bool {
			p := m.show("bootagent.service", "MainPID", "ActiveState")
			return p["MainPID"] != pid && p["ActiveState"] == "active"
		}, "the path unit restarts the agent")
		assert.Contains(t, m.sh("journalctl", "--no-pager", "-u", "bootagent-restart.service"), "Finished bootagent-restart.service")
	})

	t.Run("8: a chef-client run in progress survives systemctl restart bootagent", func(t *testing.T) {
		img.write("/etc/standin-sleep", "8s")
		defer img.write("/etc/standin-sleep", "0s")
		m.sh("systemctl", "kill", "--kill-whom=main", "-s", "USR1", "bootagent.service")
		var unit string
		testenv.Eventually(t, 30*time.Second, func() bool {
			unit = strings.Fields(m.sh("systemctl", "list-units", "--no-legend", "--plain", "--state=active", "bootagent-chef-client-*") + " -")[0]
			return unit != "-"
		}, "SIGUSR1 starts a run")
		m.sh("systemctl", "restart", "bootagent.service")
		assert.Equal(t, "active\n", m.sh("systemctl", "is-active", unit), "the run goes on while the agent restarts")
		testenv.Eventually(t, 30*time.Second, func() bool {
			s := state(t, img)
			return s.LastRun != nil && strings.Contains(unit, s.LastRun.ID) && s.LastRun.Result == "success"
		}, "the restarted agent follows the run to its end; journal:\n%s", testenv.Later(func() string { return journal(m) }))
		assert.Contains(t, journal(m), "following a chef-client run that was going when the agent restarted")
		assert.Len(t, standinRuns(t, img), 2, "one run, not restarted")
	})
	m.poweroff()

	t.Run("6a: a second boot with the same instance ID does not register again", func(t *testing.T) {
		before := state(t, img)
		m := img.boot()
		defer m.poweroff()
		testenv.Eventually(t, 60*time.Second, func() bool { return state(t, img).Bootstrapped }, "bootstrapped")
		assert.Equal(t, before.RegisteredAt, state(t, img).RegisteredAt)
		assert.Contains(t, journal(m), "already registered; registration skipped")
		assert.Equal(t, "web01.e2e.internal\n", m.sh("hostname", "-f"))
	})

	t.Run("6b: a boot with a new instance ID registers a new node", func(t *testing.T) {
		img.instance("i-0e2e0000000000002", userData)
		m := img.boot()
		defer m.poweroff()
		testenv.Eventually(t, 60*time.Second, func() bool { return state(t, img).InstanceID == "i-0e2e0000000000002" && state(t, img).Bootstrapped }, "bootstrapped as the new instance")
		assert.Equal(t, "web01-i-0e2e0000000000002", state(t, img).NodeName)
		assert.Contains(t, knife(m, "client", "list"), "web01-i-0e2e0000000000002")
		assert.Contains(t, journal(m), "a new instance: the state was left by another one")
	})

	t.Run("7: bootagent clean, then a boot: a fresh registration", func(t *testing.T) {
		out := img.nspawn("bootagent", "clean")
		assert.Contains(t, out, "removed /var/lib/bootagent/state.json")
		assert.Contains(t, out, "removed /etc/chef/client.pem")
		// The image is baked and launched: a new instance.
		img.instance("i-0e2e0000000000003", userData)
		// The runs before: an earlier boot may have been powered off
		// before its run ended.
		before := len(standinRuns(t, img))
		m := img.boot()
		defer m.poweroff()
		testenv.Eventually(t, 60*time.Second, func() bool { return state(t, img).Bootstrapped }, "bootstrapped")
		assert.NotContains(t, journal(m), "a new instance: the state was left by another one", "clean left nothing to adopt")
		assert.Contains(t, knife(m, "client", "list"), "web01-i-0e2e0000000000003")
		waitIdle(t, m, img, before+1)
		runs := standinRuns(t, img)
		assert.Equal(t, "/etc/chef/first-boot.json", runs[len(runs)-1]["first_boot"], "a fresh first boot")
	})

	t.Run("9: an Auto Scaling termination notice removes the node and client", func(t *testing.T) {
		img.instance("i-0e2e0000000000004", userData)
		// The emulator's own Auto Scaling scenario: InService, then
		// Terminated a few seconds after it starts.
		img.write("/etc/systemd/system/aemm.service.d/terminate.conf", `[Service]
ExecStart=
ExecStart=/usr/local/bin/ec2-metadata-mock asglifecycle --asg-termination-delay-sec 6 -n 127.0.0.1 -p 1338 -I -c /etc/aemm/config.json
`)
		m := img.boot()
		defer m.poweroff()
		const node = "web01-i-0e2e0000000000004"
		testenv.Eventually(t, 30*time.Second, func() bool { return state(t, img).NodeName == node && state(t, img).Bootstrapped }, "registered first")
		testenv.Eventually(t, 60*time.Second, func() bool {
			_, present := knife(m, "client", "list")[node]
			return !present
		}, "the client is removed; journal:\n%s", testenv.Later(func() string { return journal(m) }))
		_, err := m.try("knife-standin", "-s", "http://127.0.0.1:4545", "-u", "admin", "-k", "/etc/goiardi/admin.pem", "node", "show", node)
		assert.Error(t, err, "the node is removed")
		assert.Equal(t, "deregistered", state(t, img).Phase)
		assert.Contains(t, m.show("bootagent.service", "StatusText")["StatusText"], "deregistered: node and client "+node+" deleted")
		assert.Contains(t, journal(m), "the instance is terminating: deregistering from the Chef server")
	})

	t.Run("10: stopped while terminating, the agent ends the run's unit and deregisters first", func(t *testing.T) {
		img.instance("i-0e2e0000000000005", userData)
		img.write("/etc/systemd/system/aemm.service.d/terminate.conf", `[Service]
ExecStart=
ExecStart=/usr/local/bin/ec2-metadata-mock asglifecycle --asg-termination-delay-sec 8 -n 127.0.0.1 -p 1338 -I -c /etc/aemm/config.json
`)
		// The first converge outlasts the test; two minutes' notice lets it
		// go on until the instance shuts down.
		img.write("/etc/standin-sleep", "5m")
		defer img.write("/etc/standin-sleep", "0s")
		m := img.boot()
		defer m.poweroff()
		const node = "web01-i-0e2e0000000000005"
		testenv.Eventually(t, 60*time.Second, func() bool { return state(t, img).Phase == "terminating" }, "the termination is noticed during the run; journal:\n%s", testenv.Later(func() string { return journal(m) }))
		unit := strings.Fields(m.sh("systemctl", "list-units", "--no-legend", "--plain", "--state=active", "bootagent-chef-client-*") + " -")[0]
		require.NotEqual(t, "-", unit, "the run goes on")

		m.sh("systemctl", "stop", "bootagent.service")
		assert.NotEqual(t, "active\n", m.sh("systemctl", "show", "-P", "ActiveState", unit), "the run's unit is stopped")
		_, present := knife(m, "client", "list")[node]
		assert.False(t, present, "the client is removed before the agent exits; journal:\n%s", testenv.Later(func() string { return journal(m) }))
		s := state(t, img)
		assert.Equal(t, "deregistered", s.Phase)
		require.NotNil(t, s.LastRun)
		assert.Contains(t, unit, s.LastRun.ID)
		assert.Equal(t, "interrupted", s.LastRun.Result, "chef-client ended on SIGTERM")
		assert.Contains(t, journal(m), "stopping chef-client's unit")
	})

	t.Run("11: without hostnamed, a list from user-data alone, and the package's removal", func(t *testing.T) {
		// The static name written directly, hostnamed masked.
		require.NoError(t, os.Symlink("/dev/null", img.path("/etc/systemd/system/systemd-hostnamed.service")))
		img.write("/etc/bootagent/config.yaml", strings.Replace(img.read("/etc/bootagent/config.yaml"), "  allow_users: [root]\n", "", 1))
		img.instance("i-0e2e0000000000006", strings.Replace(userData, "hostname: web01\nfqdn: web01.e2e.internal\n", "hostname: web02\nfqdn: web02.e2e.internal\n", 1)+"bootagent:\n  imds:\n    allow_users: [root]\n")
		m := img.boot()
		defer m.poweroff()
		testenv.Eventually(t, 60*time.Second, func() bool { return state(t, img).Bootstrapped }, "bootstrapped; journal:\n%s", testenv.Later(func() string { return journal(m) }))
		assert.Equal(t, "web02.e2e.internal\n", img.read("/etc/hostname"), "written by the agent itself")
		assert.Equal(t, "web02.e2e.internal\n", m.sh("hostname", "-f"))
		assert.Contains(t, tokenAs(m, "65534"), "Connection refused", "user-data's list")
		for _, verb := range []string{"restart", "start"} {
			m.sh("systemctl", verb, "bootagent.service")
			assert.Contains(t, tokenAs(m, "65534"), "Connection refused", "systemctl %s bootagent leaves the table user-data asked for", verb)
		}
		m.sh("dpkg", "--remove", "bootagent")
		assert.NotEqual(t, "active\n", m.sh("systemctl", "show", "-P", "ActiveState", "bootagent.service"), "the agent is stopped first")
		assert.Contains(t, tokenAs(m, "65534"), "200 OK", "and then the filter is gone")
	})
}

// tokenAs asks the emulator for an IMDSv2 token as uid, from a process of
// that user inside the container (setpriv), and returns the answer's
// status line or why there was none.
func tokenAs(m *machine, uid string) string {
	script := `exec 3<>/dev/tcp/127.0.0.1/1338 || exit 1
printf 'PUT /latest/api/token HTTP/1.1\r\nHost: 127.0.0.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' >&3
head -n1 <&3`
	out, _ := m.try("setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--", "timeout", "10", "bash", "-c", script)
	return strings.TrimSpace(out)
}

// readIfExists reads a file that may not exist yet.
func readIfExists(path string) (string, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	return string(data), err
}
