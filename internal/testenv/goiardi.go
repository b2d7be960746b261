package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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
	// Process is goiardi's process: whether it is still running.
	*Process
	logPath  string
	adminKey string
}

// adminTimeout bounds each request of the admin client, in seconds: goiardi
// answers in milliseconds, even under a storm.
const adminTimeout = 60

// Log returns what goiardi printed so far.
func (g *Goiardi) Log() string {
	data, err := os.ReadFile(g.logPath)
	if err != nil {
		return fmt.Sprintf("(goiardi's log: %v)", err)
	}
	return string(data)
}

// StartGoiardi runs goiardi on a free loopback port until the test ends.
// It requires a private network namespace.
func StartGoiardi(t testing.TB) *Goiardi {
	t.Helper()
	return startGoiardi(t, nil)
}

// StartGoiardiTLS runs goiardi over TLS, with a certificate for 127.0.0.1
// signed by a CA made for the test; CA is that CA's certificate (PEM).
func StartGoiardiTLS(t testing.TB) (g *Goiardi, caFile string) {
	t.Helper()
	dir := t.TempDir()
	caFile, certFile, keyFile := writeTestPKI(t, dir)
	g = startGoiardi(t, []string{"--use-ssl", "--ssl-cert=" + certFile, "--ssl-key=" + keyFile})
	return g, caFile
}

func startGoiardi(t testing.TB, extra []string) *Goiardi {
	RequirePrivateNetwork(t)
	bin := Tool(t, "goiardi")
	dir := t.TempDir()
	port := FreePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := append([]string{"-A", "-I", "127.0.0.1", "-P", fmt.Sprint(port), "-H", "127.0.0.1", "--conf-root=" + dir, "-g", "error"}, extra...)
	cmd := exec.Command(bin, args...)
	log, err := os.Create(filepath.Join(dir, "goiardi.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	// Registered first, so that it runs after the process is killed.
	t.Cleanup(func() { log.Close() })
	proc := startProcess(t, cmd)
	WaitListening(t, addr, 15*time.Second, proc.Exited())

	scheme := "http"
	if len(extra) > 0 {
		scheme = "https"
	}
	g := &Goiardi{
		URL: scheme + "://" + addr, Addr: addr, ValidatorName: "chef-validator", ValidatorKey: filepath.Join(dir, "chef-validator.pem"),
		Process: proc, logPath: log.Name(), adminKey: filepath.Join(dir, "admin.pem"),
	}
	adminKey, err := os.ReadFile(g.adminKey)
	if err != nil {
		t.Fatalf("goiardi wrote no admin key: %v", err)
	}
	// The admin client is the test's view of the server; it need not check
	// the test's own certificate.
	// A server that stops answering fails the request after adminTimeout
	// instead of holding the test.
	g.Admin, err = gochef.NewClient(&gochef.Config{Name: "admin", Key: string(adminKey), BaseURL: g.URL + "/", AuthenticationVersion: gochef.AuthVersion13, SkipSSL: true, Timeout: adminTimeout})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// PlaceValidator puts the organisation's validator key where the agent
// looks for it under root (etc/chef/validation.pem, 0600), as an image
// baked for this server carries it.
func (g *Goiardi) PlaceValidator(t testing.TB, root string) {
	t.Helper()
	key, err := os.ReadFile(g.ValidatorKey)
	if err == nil {
		err = os.MkdirAll(filepath.Join(root, "etc/chef"), 0o755)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(root, "etc/chef/validation.pem"), key, 0o600)
	}
	if err != nil {
		t.Fatalf("place the validator under %s: %v", root, err)
	}
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

// ChefRepo is the tests' chef-repo (test/chef-repo): a cookbook, a role and
// an environment for the server to hand a node.
func ChefRepo() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "test", "chef-repo")
}

// Upload puts the chef-repo at repo on the server as its admin, with
// `knife-standin upload` (knife upload's way: sandboxes, then the cookbook
// versions).
func (g *Goiardi) Upload(t testing.TB, repo string) {
	t.Helper()
	out, err := exec.Command(Tool(t, "knife-standin"), "-s", g.URL, "-u", "admin", "-k", g.adminKey, "upload", repo).CombinedOutput()
	if err != nil {
		t.Fatalf("upload %s to goiardi: %v\n%s", repo, err, out)
	}
}
