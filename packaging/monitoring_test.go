package packaging

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/bootagent/bootagent/internal/testenv"
)

const (
	rulesFile     = "monitoring/bootagent.rules.yml"
	dashboardFile = "monitoring/bootagent.dashboard.json"
)

// promtool accepts the rules, and every alert's unit test passes: series
// that must fire it, and series that must not.
func TestTheRulesPassPromtool(t *testing.T) {
	promtool := testenv.Tool(t, "promtool")
	out, err := exec.Command(promtool, "check", "rules", rulesFile).CombinedOutput()
	require.NoError(t, err, "%s", out)
	cmd := exec.Command(promtool, "test", "rules", "bootagent.rules.test.yml")
	cmd.Dir = "monitoring"
	out, err = cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "SUCCESS")

	// Every alert has a test that makes it fire, and a runbook section in
	// the README, whose table lists it.
	tests, err := os.ReadFile("monitoring/bootagent.rules.test.yml")
	require.NoError(t, err)
	readme, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	for _, r := range rules(t) {
		if r.Alert != "" {
			assert.Regexp(t, `(?m)^\s+alertname: `+r.Alert+`\n\s+exp_alerts:\n\s+- exp_labels`, string(tests), "a test fires %s", r.Alert)
			for _, a := range []string{"summary", "description", "runbook"} {
				assert.NotEmpty(t, r.Annotations[a], "%s has a %s", r.Alert, a)
			}
			assert.Equal(t, "README.md#"+strings.ToLower(r.Alert), r.Annotations["runbook"])
			assert.Contains(t, string(readme), "\n#### "+r.Alert+"\n", "the README's runbook has %s", r.Alert)
			assert.Contains(t, string(readme), "| [`"+r.Alert+"`](#"+strings.ToLower(r.Alert)+") |", "the README's alert table lists %s", r.Alert)
		}
	}
}

type rule struct {
	Record, Alert, Expr string
	Annotations         map[string]string
}

func rules(t *testing.T) []rule {
	t.Helper()
	data, err := os.ReadFile(rulesFile)
	require.NoError(t, err)
	var file struct {
		Groups []struct{ Rules []rule }
	}
	require.NoError(t, yaml.Unmarshal(data, &file))
	var all []rule
	for _, g := range file.Groups {
		all = append(all, g.Rules...)
	}
	require.NotEmpty(t, all)
	return all
}

// dashboard is the parts of the Grafana dashboard the checks read.
type dashboard struct {
	Templating struct {
		List []struct {
			Name, Type string
			Query      any
			Datasource any
		}
	}
	Panels []struct {
		Title, Type string
		Datasource  any
		Targets     []struct {
			Expr       string
			Datasource any
		}
	}
}

func readDashboard(t *testing.T) dashboard {
	t.Helper()
	data, err := os.ReadFile(dashboardFile)
	require.NoError(t, err)
	var d dashboard
	require.NoError(t, json.Unmarshal(data, &d), "the dashboard is JSON")
	return d
}

// queries are every expression the rules and the dashboard send, with the
// dashboard's variables as Grafana fills them when all is chosen.
func queries(t *testing.T) map[string]string {
	t.Helper()
	q := map[string]string{}
	for _, r := range rules(t) {
		q["rule "+r.Record+r.Alert] = r.Expr
	}
	fill := strings.NewReplacer("$job", ".*", "$instance", ".*", "$__rate_interval", "1m")
	for _, p := range readDashboard(t).Panels {
		for i, target := range p.Targets {
			q[fmt.Sprintf("panel %q query %d", p.Title, i)] = fill.Replace(target.Expr)
		}
	}
	return q
}

// metricNames are the series an expression selects: the names outside its
// string literals.
func metricNames(expr string) []string {
	unquoted := regexp.MustCompile(`"(?:[^"\\]|\\.)*"`).ReplaceAllString(expr, `""`)
	return regexp.MustCompile(`\b((?:bootagent_|node_textfile_|job:bootagent_)[a-zA-Z0-9_:]*|up)\b`).FindAllString(unquoted, -1)
}

// The dashboard works on any Prometheus: the data source is a variable,
// instance and job are template variables, and every panel queries only
// what the agent, node_exporter or the recording rules export.
func TestTheDashboardIsPortable(t *testing.T) {
	d := readDashboard(t)
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	assert.Equal(t, map[string]string{"datasource": "datasource", "job": "query", "instance": "query"}, vars)
	records := map[string]bool{}
	for _, r := range rules(t) {
		if r.Record != "" {
			records[r.Record] = true
		}
	}
	exported := exportedNames(t)
	source := map[string]any{"type": "prometheus", "uid": "${datasource}"}
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		assert.Equal(t, source, p.Datasource, "panel %q takes the data source variable", p.Title)
		require.NotEmpty(t, p.Targets, "panel %q has a query", p.Title)
		for _, target := range p.Targets {
			assert.Equal(t, source, target.Datasource, "panel %q", p.Title)
			names := metricNames(target.Expr)
			assert.NotEmpty(t, names, "panel %q queries a metric: %s", p.Title, target.Expr)
			for _, n := range names {
				assert.True(t, records[n] || exported[n] || strings.HasPrefix(n, "node_textfile_"), "panel %q: %s is neither exported nor recorded", p.Title, n)
			}
		}
	}
	data, err := os.ReadFile(dashboardFile)
	require.NoError(t, err)
	assert.NotRegexp(t, `"uid":\s*"[^$"][^"]*"\s*,?\s*\}?\s*,?\s*"type":\s*"prometheus"|"type":\s*"prometheus",\s*"uid":\s*"[^$]`, string(data), "no data source UID is written in")
}

// exportedNames are the metric families the agent exports, read from its
// package's source (metrics.go), so that a renamed metric fails the check.
func exportedNames(t *testing.T) map[string]bool {
	t.Helper()
	src, err := os.ReadFile("../metrics/metrics.go")
	require.NoError(t, err)
	names := map[string]bool{"up": true}
	for _, m := range regexp.MustCompile(`Name: "(bootagent_[a-z_]+)"`).FindAllStringSubmatch(string(src), -1) {
		names[m[1]] = true
	}
	require.Greater(t, len(names), 10)
	return names
}

// agentRun starts `bootagent run` against the emulator and goiardi (with
// the Go chef-client stand-in), its listener on loopback and its textfile
// in node_exporter's directory under its root, polling IMDS every 100 ms:
// the textfile is rewritten at every poll. It returns the listener's
// address and the textfile's directory, once the agent has converged.
func agentRun(t *testing.T) (listen, textDir string) {
	t.Helper()
	testenv.RequirePrivateUTS(t)
	emu := testenv.StartIMDS(t, testenv.IMDSConfig{UserData: []byte("hostname=mon01\ndomain=example.internal\nchef_run_list=role[web]\n")})
	g := testenv.StartGoiardi(t)
	root := t.TempDir()
	const textfile = "/var/lib/node_exporter/textfile_collector/bootagent.prom"
	textDir = filepath.Join(root, filepath.Dir(textfile))
	require.NoError(t, os.MkdirAll(textDir, 0o755))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/chef"), 0o755))
	g.PlaceValidator(t, root)
	listen = fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	config := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(config, fmt.Appendf(nil, `imds:
  endpoint: %s
  poll_interval: 100ms
chef:
  server_url: %s
  client_command: [%q]
metrics:
  listen: %s
  textfile: %s
`, emu.URL, g.URL, testenv.Tool(t, "chefclient-standin"), listen, textfile), 0o644))
	cmd := exec.Command(testenv.Tool(t, "bootagent"), "run", "--config", config, "--root", root)
	log := &testenv.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	testenv.Eventually(t, 30*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(textDir, "bootagent.prom"))
		return err == nil && strings.Contains(log.String(), "chef-client run finished")
	}, "the agent registers, converges and writes its textfile; its log:\n%s", testenv.Later(log.String))
	return listen, textDir
}

// What the agent exposes is what Prometheus' own tools accept, read
// through node_exporter's textfile collector while the agent rewrites the
// file at every poll, and queried by a real Prometheus: every rule's and
// every panel's expression parses, and each series it names has data.
func TestTheRealToolsReadTheAgentsMetrics(t *testing.T) {
	listen, dir := agentRun(t)

	promtool := testenv.Tool(t, "promtool")
	for name, exposition := range map[string]string{"the listener": testenv.Scrape(t, "http://"+listen+"/metrics"), "the textfile": readFile(t, filepath.Join(dir, "bootagent.prom"))} {
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(exposition)
		out, err := cmd.CombinedOutput()
		assert.NoError(t, err, "%s: %s", name, out)
		assert.Empty(t, string(out), "promtool check metrics finds nothing in %s", name)
	}

	node := testenv.StartNodeExporter(t, dir)
	for i := range 30 {
		page := testenv.Scrape(t, node.URL+"/metrics")
		require.Contains(t, page, "\nnode_textfile_scrape_error 0\n", "scrape %d of node_exporter, the agent rewriting its file", i)
		require.Contains(t, page, "\nbootagent_phase{phase=\"idle\"} 1\n", "scrape %d", i)
		require.Contains(t, page, "bootagent_info{", "scrape %d", i)
		time.Sleep(50 * time.Millisecond) // Scrapes spread over the agent's polls, not an event awaited.
	}
	assert.NotContains(t, node.Log(), "error gathering metrics", "node_exporter takes the textfile beside its own metrics")

	rulesPath, err := filepath.Abs(rulesFile)
	require.NoError(t, err)
	prom := testenv.StartPrometheus(t, fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: bootagent
    static_configs: [{targets: [%q]}]
  - job_name: node
    static_configs: [{targets: [%q]}]
`, rulesPath, listen, strings.TrimPrefix(node.URL, "http://")))
	testenv.Eventually(t, 60*time.Second, func() bool {
		return prom.Query(t, `job:bootagent_instances_converged:ratio{job="bootagent"} == 1`).Series == 1 &&
			prom.Query(t, `count(up == 1) == 2`).Series == 1 &&
			// Two scrapes of each target at least, for rate() and increase().
			prom.Query(t, `count(count_over_time(bootagent_info[1m]) >= 2) == 2`).Series == 1
	}, "Prometheus scrapes the agent and node_exporter and records the fleet views; its log:\n%s", testenv.Later(prom.Log))

	// Panels that show only what goes wrong are empty on a healthy run.
	emptyWhenHealthy := map[string]bool{"Last run failing": true}
	seen := map[string]bool{}
	for what, expr := range queries(t) {
		r := prom.Query(t, expr)
		assert.Equal(t, "success", r.Status, "%s: %s: %s", what, expr, r.Error)
		if strings.HasPrefix(what, "panel ") && !emptyWhenHealthy[strings.Split(what, `"`)[1]] {
			assert.Positive(t, r.Series, "%s answers with data: %s", what, expr)
		}
		for _, n := range metricNames(expr) {
			if !seen[n] {
				seen[n] = true
				assert.Positive(t, prom.Query(t, "count("+n+")").Series, "%s: %s has data", what, n)
			}
		}
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range seen {
			if !yield(n) {
				return
			}
		}
	})
	t.Logf("queried: %s", strings.Join(names, ", "))
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(data)
}
