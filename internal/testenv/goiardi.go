package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	gochef "github.com/go-chef/chef"
)

// Goiardi is a running Chef server (goiardi, with authentication on).
type Goiardi struct {
	// URL is the server URL to give the agent.
	URL string
	// ValidatorName and ValidatorKey are the organisation's validator.
	ValidatorName string
	ValidatorKey  string
	// Admin is a client with admin rights, for asserting on the server's
	// state.
	Admin *gochef.Client
	// Addr is the host:port it listens on.
	Addr string
}

// StartGoiardi runs goiardi on a free loopback port until the test ends.
// It requires a private network namespace.
func StartGoiardi(t testing.TB) *Goiardi {
	t.Helper()
	RequirePrivateNetwork(t)
	bin := Tool(t, "goiardi")
	dir := t.TempDir()
	port := FreePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(bin, "-A", "-I", "127.0.0.1", "-P", fmt.Sprint(port), "-H", "127.0.0.1", "--conf-root="+dir, "-g", "error")
	log, err := os.Create(filepath.Join(dir, "goiardi.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("start goiardi: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		log.Close()
	})
	WaitListening(t, addr, 15*time.Second, exited)

	g := &Goiardi{URL: "http://" + addr, Addr: addr, ValidatorName: "chef-validator", ValidatorKey: filepath.Join(dir, "chef-validator.pem")}
	adminKey, err := os.ReadFile(filepath.Join(dir, "admin.pem"))
	if err != nil {
		t.Fatalf("goiardi wrote no admin key: %v", err)
	}
	g.Admin, err = gochef.NewClient(&gochef.Config{Name: "admin", Key: string(adminKey), BaseURL: g.URL + "/", AuthenticationVersion: gochef.AuthVersion13})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// Clients lists the client names on the server, validator and admin
// included.
func (g *Goiardi) Clients(t testing.TB) map[string]string {
	t.Helper()
	list, err := g.Admin.Clients.List()
	if err != nil {
		t.Fatalf("list clients: %v", err)
	}
	return list
}

// Node fetches a node, failing the test if it does not exist.
func (g *Goiardi) Node(t testing.TB, name string) gochef.Node {
	t.Helper()
	n, err := g.Admin.Nodes.Get(name)
	if err != nil {
		t.Fatalf("get node %s: %v", name, err)
	}
	return n
}

// ClientPublicKey returns the public key the server holds for a client.
func (g *Goiardi) ClientPublicKey(t testing.TB, name string) string {
	t.Helper()
	var out struct {
		PublicKey string `json:"public_key"`
	}
	req, err := g.Admin.NewRequest("GET", "clients/"+name, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := g.Admin.Do(req, &out)
	if err != nil {
		t.Fatalf("get client %s: %v", name, err)
	}
	res.Body.Close()
	return out.PublicKey
}
