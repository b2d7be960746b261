package testenv

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Prometheus is a real Prometheus server (Debian's prometheus) on loopback.
type Prometheus struct {
	URL     string
	Process *Process
	logPath string
}

// StartPrometheus starts Prometheus with config (prometheus.yml's text)
// and a store of its own, and waits until it answers.
func StartPrometheus(t testing.TB, config string) *Prometheus {
	t.Helper()
	RequirePrivateNetwork(t)
	bin := Tool(t, "prometheus")
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	log, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { log.Close() })
	cmd := exec.Command(bin, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+addr)
	cmd.Stdout, cmd.Stderr = log, log
	p := &Prometheus{URL: "http://" + addr, Process: startProcess(t, cmd), logPath: log.Name()}
	WaitListening(t, addr, 30*time.Second, p.Process.Exited())
	return p
}

// Log is what Prometheus printed, for a failure to show.
func (p *Prometheus) Log() string {
	data, err := os.ReadFile(p.logPath)
	return tail(orErr(string(data), err), 40)
}

// QueryResult is an instant query's answer: its status, its error if any,
// and how many series it returned.
type QueryResult struct {
	Status, Error string
	Series        int
}

// Query evaluates expr now, through the HTTP API.
func (p *Prometheus) Query(t testing.TB, expr string) QueryResult {
	t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	res, err := c.Get(p.URL + "/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		t.Fatalf("query %s: %v", expr, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 16<<20))
	if err != nil {
		t.Fatalf("query %s: %v", expr, err)
	}
	if res.StatusCode == http.StatusServiceUnavailable {
		// Prometheus answers 503 until it has loaded its store.
		return QueryResult{Status: "unavailable"}
	}
	var answer struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &answer); err != nil {
		t.Fatalf("query %s: HTTP %d, not JSON: %v: %.200s", expr, res.StatusCode, err, body)
	}
	return QueryResult{Status: answer.Status, Error: answer.Error, Series: len(answer.Data.Result)}
}

// NodeExporter is Debian's prometheus-node-exporter with only its textfile
// collector, on loopback.
type NodeExporter struct {
	URL     string
	Process *Process
	logPath string
}

// StartNodeExporter starts node_exporter reading the textfiles in dir.
func StartNodeExporter(t testing.TB, dir string) *NodeExporter {
	t.Helper()
	RequirePrivateNetwork(t)
	bin := Tool(t, "prometheus-node-exporter")
	addr := fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	log, err := os.Create(filepath.Join(t.TempDir(), "node_exporter.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { log.Close() })
	cmd := exec.Command(bin, "--web.listen-address="+addr, "--collector.disable-defaults", "--collector.textfile", "--collector.textfile.directory="+dir)
	cmd.Stdout, cmd.Stderr = log, log
	n := &NodeExporter{URL: "http://" + addr, Process: startProcess(t, cmd), logPath: log.Name()}
	WaitListening(t, addr, 15*time.Second, n.Process.Exited())
	return n
}

// Log is what node_exporter printed.
func (n *NodeExporter) Log() string {
	data, err := os.ReadFile(n.logPath)
	return tail(orErr(string(data), err), 40)
}

// Scrape reads a /metrics page: the agent's listener or node_exporter's.
func Scrape(t testing.TB, url string) string {
	t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	res, err := c.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 16<<20))
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: HTTP %d: %v", url, res.StatusCode, err)
	}
	return string(body)
}
