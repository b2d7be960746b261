package testenv

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// IMDSConfig sets what the AWS IMDS emulator (amazon-ec2-metadata-mock)
// serves.
type IMDSConfig struct {
	InstanceID    string
	Region        string
	LocalHostname string
	// UserData is served at /latest/user-data; nil serves a 404, as IMDS
	// does for an instance launched without user-data.
	UserData []byte
	// Tags are served under /latest/meta-data/tags/instance/; the emulator
	// has room for two.
	Tags map[string]string
	// AllowIMDSv1 serves requests without a session token too; by default
	// the emulator runs IMDSv2-only.
	AllowIMDSv1 bool
	// Command is an emulator subcommand and its flags, such as
	// {"spot", "-a", "terminate", "-d", "2"}. Empty mocks every path, with
	// the termination, spot and rebalance notices put off by a day: by
	// default the emulator announces them at once, and a test that wants
	// one asks for it.
	Command []string
	// Address is where the emulator listens: 127.0.0.1 when empty, or an
	// address AddLocalAddress gave the test's own network namespace.
	Address string
}

// IMDS is a running emulator.
type IMDS struct {
	// URL is the endpoint to give the agent: http://127.0.0.1:PORT.
	URL string
	// Process is the emulator's process: whether it is still running.
	*Process

	mu  sync.Mutex
	log bytes.Buffer
}

// Log returns what the emulator printed so far.
func (m *IMDS) Log() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.log.String()
}

func (m *IMDS) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.log.Write(p)
}

// StartIMDS runs the AWS IMDS emulator on a free port of c.Address
// (loopback by default) until the test ends. It requires a network
// namespace of the test's own: an agent pointed at the emulator keeps, or
// removes, the IMDS filter of the namespace it runs in.
func StartIMDS(t testing.TB, c IMDSConfig) *IMDS {
	t.Helper()
	RequireOwnFirewall(t)
	bin := Tool(t, "ec2-metadata-mock")
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "aemm-config.json")
	data, err := json.Marshal(emulatorConfig(c))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgPath, data, 0o600); err != nil {
		t.Fatal(err)
	}

	port := FreePort(t)
	args := append([]string{}, c.Command...)
	if len(c.Command) == 0 {
		const day = "86400"
		args = append(args, "-d", day, "--asg-termination-delay-sec", day, "--rebalance-delay-sec", day)
	}
	addr := c.Address
	if addr == "" {
		addr = "127.0.0.1"
	}
	hostPort := net.JoinHostPort(addr, fmt.Sprint(port))
	listen := addr
	if strings.Contains(addr, ":") {
		// The emulator joins host and port itself: an IPv6 address is
		// bracketed for it.
		listen = "[" + addr + "]"
	}
	args = append(args, "-n", listen, "-p", fmt.Sprint(port), "-c", cfgPath)
	if !c.AllowIMDSv1 {
		args = append(args, "-I")
	}
	m := &IMDS{URL: "http://" + hostPort}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "HOME="+dir)
	cmd.Stdout, cmd.Stderr = m, m
	// Registered first, so that it runs after the process is killed.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("IMDS emulator log:\n%s", tail(m.Log(), 40))
		}
	})
	m.Process = startProcess(t, cmd)
	WaitListening(t, hostPort, 10*time.Second, m.Exited())
	return m
}

func emulatorConfig(c IMDSConfig) map[string]any {
	id := c.InstanceID
	if id == "" {
		id = "i-0123456789abcdef0"
	}
	region := c.Region
	if region == "" {
		region = "eu-west-1"
	}
	local := c.LocalHostname
	if local == "" {
		local = "ip-10-0-7-10." + region + ".compute.internal"
	}
	metaValues := map[string]any{
		"instance-id":                 id,
		"local-hostname":              local,
		"hostname":                    local,
		"placement-region":            region,
		"placement-availability-zone": region + "a",
	}
	// The emulator serves two tags, from two fixed slots; each slot's path
	// names the tag key. Unused slots are moved out of the tags tree.
	slots := []string{"tags-instance-name", "tags-instance-test"}
	if len(c.Tags) > len(slots) {
		panic("testenv: the IMDS emulator serves at most two tags")
	}
	metaPaths := map[string]any{}
	for i, k := range sortedKeys(c.Tags) {
		metaPaths[slots[i]] = "/latest/meta-data/tags/instance/" + k
		metaValues[slots[i]] = c.Tags[k]
	}
	for _, slot := range slots[len(c.Tags):] {
		metaPaths[slot] = "/latest/-unused/" + slot
	}
	cfg := map[string]any{
		"metadata": map[string]any{"values": metaValues, "paths": metaPaths},
		"dynamic": map[string]any{"values": map[string]any{
			"instance-identity-document": map[string]any{
				"accountId":        "123456789012",
				"architecture":     "x86_64",
				"availabilityZone": region + "a",
				"imageId":          "ami-0123456789abcdef0",
				"instanceId":       id,
				"instanceType":     "m7g.large",
				"pendingTime":      "2026-11-25T08:00:00Z",
				"privateIp":        "10.0.7.10",
				"region":           region,
				"version":          "2017-09-30",
			},
		}},
	}
	if c.UserData == nil {
		cfg["userdata"] = map[string]any{"paths": map[string]any{"userdata": "/latest/-no-user-data"}}
	} else {
		cfg["userdata"] = map[string]any{"values": map[string]any{"userdata": base64.StdEncoding.EncodeToString(c.UserData)}}
	}
	return cfg
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
