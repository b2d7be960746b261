package agent

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

// chefSetup is an instance under a temporary root, with the IMDS emulator,
// goiardi, the organisation's validator in place, and the chef-client
// stand-in as chef.client_command.
type chefSetup struct {
	root    string
	goiardi *testenv.Goiardi
	record  string
	engine  *Engine
	logs    *observer.ObservedLogs
}

func newChefSetup(t testing.TB, userData string, mod ...func(*config.Config)) *chefSetup {
	t.Helper()
	s := &chefSetup{root: newRoot(t), goiardi: testenv.StartGoiardi(t)}
	s.record = filepath.Join(t.TempDir(), "runs.jsonl")
	s.goiardi.PlaceValidator(t, s.root)
	standin := testenv.Tool(t, "chefclient-standin")
	s.engine, s.logs = newEngine(t, testenv.IMDSConfig{InstanceID: "i-0123456789abcdef0", UserData: []byte(userData)}, s.root, append([]func(*config.Config){func(c *config.Config) {
		c.Chef.ServerURL = s.goiardi.URL
		c.Chef.ClientCommand = []string{standin, "--record", s.record}
	}}, mod...)...)
	return s
}

// runs reads what the stand-in recorded of each chef-client run.
func (s *chefSetup) runs(t *testing.T) []map[string]any {
	t.Helper()
	f, err := os.Open(s.record)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var rec map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &rec))
		out = append(out, rec)
	}
	return out
}

func TestOnceRegistersAndConverges(t *testing.T) {
	s := newChefSetup(t, "#cloud-config\nfqdn: web01.example.internal\nchef:\n  run_list: [\"role[web]\", \"base\"]\n  environment: production\n  initial_attributes:\n    app: {port: 8080}\n")

	res, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "web01.example.internal", res.NodeName)
	assert.Equal(t, chef.Registered{ClientCreated: true, NodeCreated: true}, res.Registered)
	require.NotNil(t, res.FirstRun)
	assert.Equal(t, chef.ResultSuccess, res.FirstRun.Result)

	node := s.goiardi.Node(t, "web01.example.internal")
	assert.Equal(t, []string{"role[web]", "recipe[base]"}, node.RunList)
	assert.Equal(t, "production", node.Environment)
	assert.Equal(t, map[string]any{"port": float64(8080)}, node.NormalAttributes["app"])
	assert.Equal(t, true, node.AutomaticAttributes["chef_client_standin"], "the stand-in saved the node with its own key")

	keyPEM := readFile(t, filepath.Join(s.root, "etc/chef/client.pem"))
	key, err := chef.ParseKey([]byte(keyPEM))
	require.NoError(t, err)
	pub, err := chef.PublicKeyPEM(key)
	require.NoError(t, err)
	assert.Equal(t, strings.TrimSpace(pub), strings.TrimSpace(s.goiardi.ClientPublicKey(t, "web01.example.internal")), "client.pem matches the server's public key")
	fi, err := os.Stat(filepath.Join(s.root, "etc/chef/client.pem"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	_, err = os.Stat(filepath.Join(s.root, "etc/chef/validation.pem"))
	assert.True(t, os.IsNotExist(err), "the validator is deleted after registration")

	runs := s.runs(t)
	require.Len(t, runs, 1)
	assert.Equal(t, filepath.Join(s.root, "etc/chef/first-boot.json"), runs[0]["first_boot"], "the first run gets -j first-boot.json")
	assert.JSONEq(t, `{"run_list": ["role[web]", "recipe[base]"], "app": {"port": 8080}}`, readFile(t, filepath.Join(s.root, "etc/chef/first-boot.json")))
	assert.Contains(t, readFile(t, filepath.Join(s.root, "etc/chef/client.rb")), "environment                      'production'\n")
}

func TestOnceAgainOnTheSameInstanceDoesNotRegisterAgain(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\nchef_run_list=role[web]\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)

	res, err := s.engine.Once(context.Background())
	require.NoError(t, err, "the validator was deleted; the state says the instance is registered")
	assert.True(t, res.AlreadyRegistered)
	assert.Equal(t, chef.Registered{}, res.Registered, "no request to create anything")
	runs := s.runs(t)
	require.Len(t, runs, 2)
	assert.Empty(t, runs[1]["first_boot"], "the first-boot JSON served its purpose")
}

func TestOnceRepairsARegistrationWhoseStateWasLost(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	require.NoError(t, os.Remove(filepath.Join(s.root, "var/lib/bootagent/state.json")))

	res, err := s.engine.Once(context.Background())
	require.NoError(t, err, "the node's key still opens the door; no validator needed")
	assert.Equal(t, chef.Registered{KeyReused: true}, res.Registered)
}

func TestOnceFailsWhenTheFirstRunFails(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n", func(c *config.Config) {
		c.Chef.ClientCommand = append(c.Chef.ClientCommand, "--exit", "1")
	})
	res, err := s.engine.Once(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "chef-client run ")
	assert.Contains(t, err.Error(), "failed (exit code 1)")
	assert.Equal(t, 1, ExitCode(err))
	assert.Equal(t, chef.ResultFailed, res.FirstRun.Result)
}

func TestOnceRefusesBadChefSettingsBeforeWritingAnything(t *testing.T) {
	tests := []struct {
		name, userData, want string
	}{
		{"a hostile run list item", "hostname=web01\nchef_run_list=recipe[x]',system('id')\n", `key chef_run_list: invalid Chef setting: run list item "recipe[x]'"`},
		{"a node name with a quote", "hostname=web01\nchef_node_name=web'01\n", `key chef_node_name: invalid Chef setting: node name "web'01"`},
		{"an unknown placeholder", "hostname=web01\nchef_node_name={host}\n", "unknown placeholder {host}"},
		{"an environment with a space", "hostname=web01\nchef_environment=prod uction\n", `environment "prod uction"`},
		{"a server URL with a newline", "#cloud-config\nhostname: web01\nchef:\n  server_url: \"http://a/\\nsystem('id')\"\n", "key chef.server_url: chef.server_url: \"http://a/\\nsystem('id')\" is not a URL"},
		{"a client key path with a tab", "#cloud-config\nhostname: web01\nchef:\n  client_key: \"/etc/chef/a\\tb.pem\"\n", `user-data #cloud-config line 4 key chef.client_key: client.rb client_key: invalid Chef setting: `},
		{"a mangled validator key", "#cloud-config\nhostname: web01\nchef:\n  validation_cert: not a key\n", "chef.validation_cert: invalid Chef setting: validation key"},
		{"attributes that override the run list", `{"hostname": "web01", "chef_initial_attributes": {"run_list": ["recipe[evil]"]}}`, `initial attribute "run_list"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newChefSetup(t, tt.userData)
			_, err := s.engine.Once(context.Background())
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			assert.Equal(t, 2, ExitCode(err))
			assert.Equal(t, "localhost", kernelHostname(t), "nothing applied, not even the host name")
			assert.Equal(t, debianHosts, readFile(t, filepath.Join(s.root, "etc/hosts")))
			_, err = os.Stat(filepath.Join(s.root, "etc/chef/client.pem"))
			assert.True(t, os.IsNotExist(err), "no key made")
			assert.Empty(t, s.goiardi.Clients(t)["web01"], "nothing registered")
		})
	}
}

func TestOnceTakesAValidatorKeyFromUserData(t *testing.T) {
	s := newChefSetup(t, "")
	validator := readFile(t, filepath.Join(s.root, "etc/chef/validation.pem"))
	require.NoError(t, os.Remove(filepath.Join(s.root, "etc/chef/validation.pem")))
	// As it often arrives from a launch form: newlines turned into spaces.
	mangled := strings.ReplaceAll(strings.TrimSpace(validator), "\n", " ")
	var logs *observer.ObservedLogs
	s.engine, logs = newEngine(t, testenv.IMDSConfig{UserData: []byte("#cloud-config\nhostname: web01\nchef:\n  validation_cert: \"" + mangled + "\"\n")}, s.root, func(c *config.Config) {
		c.Chef.ServerURL = s.goiardi.URL
		c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin")}
	})
	res, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.True(t, res.Registered.ClientCreated)
	_, err = os.Stat(filepath.Join(s.root, "etc/chef/validation.pem"))
	assert.True(t, os.IsNotExist(err), "written for registration, then deleted")

	_, err = s.engine.Once(context.Background())
	require.NoError(t, err, "a second bootstrap of the same process")
	warned := logs.FilterMessageSnippet("user-data carries the Chef validator key").All()
	require.Len(t, warned, 1, "said once per process")
	assert.Equal(t, zapcore.WarnLevel, warned[0].Level)
	assert.Contains(t, warned[0].Message, "imds.allow_users")
	assert.Contains(t, warned[0].Message, "bake it into the image")
	// A line of the key's base64, as it would appear if any log quoted it.
	keyLine := strings.Split(strings.TrimSpace(validator), "\n")[3]
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	for _, entry := range logs.All() {
		line, err := enc.EncodeEntry(entry.Entry, entry.Context)
		require.NoError(t, err)
		assert.NotContains(t, line.String(), keyLine, "the log line as written")
	}
}

func TestRunConvergesAtOnceAndOnSIGUSR1(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\nchef_run_list=role[web]\n")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.engine.Run(ctx) }()

	testenv.Eventually(t, 15*time.Second, func() bool { return len(s.runs(t)) == 1 }, "the first chef-client run starts right after registration")
	first := s.runs(t)[0]
	assert.NotEmpty(t, first["first_boot"], "with -j")
	// Idle again: the schedule has seen the run end, so that the trigger
	// below is not a request during the run (which is skipped).
	var st State
	testenv.Eventually(t, 5*time.Second, func() bool {
		st, _ = ReadState(s.root)
		return st.NextRun != nil && st.LastRun != nil && st.LastRun.Result == chef.ResultSuccess && st.Phase == PhaseIdle
	}, "the run is recorded")
	assert.WithinDuration(t, time.Now().Add(30*time.Minute), *st.NextRun, 6*time.Minute, "next run an interval plus at most the splay away")

	s.engine.TriggerRun()
	testenv.Eventually(t, 15*time.Second, func() bool { return len(s.runs(t)) == 2 }, "SIGUSR1 starts a run at once")
	assert.Empty(t, s.runs(t)[1]["first_boot"], "later runs go without -j")
	cancel()
	require.NoError(t, <-done)
}

func TestOnceOnAnInstanceAlreadyTerminatingRegistersNothing(t *testing.T) {
	s := newChefSetup(t, "")
	s.engine, _ = newEngine(t, testenv.IMDSConfig{Command: []string{"asglifecycle", "--asg-termination-delay-sec", "0"}, UserData: []byte("hostname=web01\n")}, s.root,
		func(c *config.Config) {
			c.Chef.ServerURL = s.goiardi.URL
			c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin"), "--record", s.record}
		})
	res, err := s.engine.Once(context.Background())
	require.NoError(t, err, "nothing to do is no failure")
	assert.Equal(t, "Auto Scaling target lifecycle state Terminated", res.Terminating)
	assert.Empty(t, s.goiardi.Clients(t)["web01"], "no node for an instance that is going away")
	assert.Empty(t, s.runs(t))
	var out strings.Builder
	require.NoError(t, res.WriteText(&out))
	assert.Contains(t, out.String(), "web01 not registered: the instance is terminating (Auto Scaling target lifecycle state Terminated)")
}

func TestAFirstRunWhoseLicenseIsNotAcceptedSaysWhatToSet(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n", func(c *config.Config) {
		c.Chef.ClientCommand = append(c.Chef.ClientCommand, "--exit", "172")
	})
	res, err := s.engine.Once(context.Background())
	require.Error(t, err)
	assert.Equal(t, chef.ResultLicenseNotAccepted, res.FirstRun.Result)
	assert.Contains(t, err.Error(), "license_not_accepted (exit code 172): chef-client refuses to run until its license is accepted: set chef.license: accept")
	failed := s.logs.FilterMessage("chef-client run failed").All()
	require.Len(t, failed, 1)
	assert.Contains(t, failed[0].ContextMap()["fix"], "set chef.license: accept")
}

func TestTheLicenseAndChefClientsSettingsReachClientRB(t *testing.T) {
	s := newChefSetup(t, "#cloud-config\nhostname: web01\nchef:\n  chef_license: accept\n  log_level: :warn\n  encrypted_data_bag_secret: /etc/chef/encrypted_data_bag_secret\n"+
		"  firstboot_path: /etc/chef/firstboot.json\n  json_attribs: /etc/chef/firstboot.json\n  show_time: false\n  run_list: [base]\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	firstBoot := filepath.Join(s.root, "etc/chef/firstboot.json")
	assert.JSONEq(t, `{"run_list": ["recipe[base]"]}`, readFile(t, firstBoot), "written where chef.firstboot_path says")
	assert.Equal(t, firstBoot, s.runs(t)[0]["first_boot"], "and given to the first run's -j")
	rb := readFile(t, filepath.Join(s.root, "etc/chef/client.rb"))
	assert.Contains(t, rb, "json_attribs                     '"+firstBoot+"'\n", "taken inside the root")
	assert.Contains(t, rb, "Mixlib::Log::Formatter.show_time = false\n")
	assert.Contains(t, rb, "chef_license                     'accept'\n")
	assert.Contains(t, rb, "log_level                        :warn\n")
	assert.Contains(t, rb, "encrypted_data_bag_secret        '"+filepath.Join(s.root, "etc/chef/encrypted_data_bag_secret")+"'\n", "taken inside the root, as the client key is")
}

func TestRegistrationTellsOhaiThisIsEC2AndNothingOfIAM(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.JSONEq(t, "{}", readFile(t, filepath.Join(s.root, "etc/chef/ohai/hints/ec2.json")), "Ohai's ec2 plugin then runs on every instance type")
	assert.NoFileExists(t, filepath.Join(s.root, "etc/chef/ohai/hints/iam.json"), "the iam hint would copy the role's data into the node")
}

func TestAMissingChefClientIsSaidToBeTheImagesToCarry(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n", func(c *config.Config) {
		c.Chef.ClientCommand = []string{"chef-client-not-on-this-machine"}
	})
	_, err := s.engine.Once(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), `chef.client_command "chef-client-not-on-this-machine" is not on this machine`)
	assert.Contains(t, err.Error(), "the image must carry chef-client")
}

// forwardProxy is an HTTP proxy on loopback that knows one host name the
// machine does not (the Chef server's), as a corporate proxy would, and
// counts what it is asked for. It forwards plain HTTP requests, and tunnels
// CONNECT (HTTPS) to the same host.
type forwardProxy struct {
	*httptest.Server
	mu   sync.Mutex
	seen []string
}

func newForwardProxy(t *testing.T, host, target string) *forwardProxy {
	t.Helper()
	u, err := url.Parse(target)
	require.NoError(t, err)
	p := &forwardProxy{}
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		if r.Method == http.MethodConnect {
			p.seen = append(p.seen, r.Method+" "+r.Host)
		} else {
			p.seen = append(p.seen, r.Method+" "+r.URL.String())
		}
		p.mu.Unlock()
		if r.Method == http.MethodConnect {
			tunnel(w, r, host, u.Host)
			return
		}
		if r.URL.Host != host {
			http.Error(w, "unknown host "+r.URL.Host, http.StatusBadGateway)
			return
		}
		out := r.Clone(r.Context())
		out.RequestURI, out.URL.Scheme, out.URL.Host = "", u.Scheme, u.Host
		res, err := http.DefaultTransport.RoundTrip(out)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer res.Body.Close()
		maps.Copy(w.Header(), res.Header)
		w.WriteHeader(res.StatusCode)
		_, _ = io.Copy(w, res.Body)
	}))
	t.Cleanup(p.Close)
	return p
}

// tunnel answers a CONNECT to host by joining the client to target.
func tunnel(w http.ResponseWriter, r *http.Request, host, target string) {
	if r.Host != host {
		http.Error(w, "unknown host "+r.Host, http.StatusBadGateway)
		return
	}
	up, err := net.Dial("tcp", target)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer up.Close()
	down, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer down.Close()
	if _, err := rw.WriteString("HTTP/1.1 200 Connection established\r\n\r\n"); err != nil || rw.Flush() != nil {
		return
	}
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, rw); done <- struct{}{} }()
	go func() { _, _ = io.Copy(down, up); done <- struct{}{} }()
	<-done
	<-done
}

func (p *forwardProxy) requests() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.seen)
}

func TestTheChefServerIsReachedThroughTheProxyAndIMDSNever(t *testing.T) {
	const host = "chef.corp.example:4000" // resolvable only by the proxy
	s := newChefSetup(t, "hostname=web01\n")
	proxy := newForwardProxy(t, host, s.goiardi.URL)
	s.engine, _ = newEngine(t, testenv.IMDSConfig{UserData: []byte("hostname=web01\n")}, s.root, func(c *config.Config) {
		c.Chef.ServerURL = "http://" + host
		c.Chef.HTTPProxy = proxy.URL
		c.Chef.NoProxy = "internal.example"
		// chef-client takes client.rb's proxies with Chef's own code
		// (ChefConfig's export_proxies and proxy_uri).
		c.Chef.ClientCommand = []string{"chefclient-ruby-standin", "--record", s.record}
		c.Chef.License = "accept-no-persist"
		c.Chef.FileCachePath = filepath.Join(s.root, "var/cache/chef")
	})

	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	seen := proxy.requests()
	assert.Contains(t, seen, "POST http://"+host+"/clients", "the registration went through the proxy")
	assert.Contains(t, seen, "GET http://"+host+"/nodes/web01", "and chef-client's run, by client.rb's http_proxy")
	assert.Contains(t, seen, "PUT http://"+host+"/nodes/web01", "the node saved through it too")
	for _, r := range seen {
		assert.NotContains(t, r, "/latest/", "no IMDS request goes through the proxy")
	}
	rb := readFile(t, filepath.Join(s.root, "etc/chef/client.rb"))
	assert.Contains(t, rb, "http_proxy                       '"+proxy.URL+"'\n")
	assert.Contains(t, rb, "no_proxy                         'internal.example,169.254.169.254,fd00:ec2::254'\n", "chef-client keeps IMDS off the proxy too")
}

func TestTheChefServerIsReachedOverHTTPSThroughTheProxysTunnel(t *testing.T) {
	// example.com is the name httptest's certificate is for; only the
	// proxy knows where it is.
	const host = "example.com:4443"
	s := newChefSetup(t, "hostname=web01\n")
	goiardi, err := url.Parse(s.goiardi.URL)
	require.NoError(t, err)
	front := httptest.NewTLSServer(httputil.NewSingleHostReverseProxy(goiardi))
	t.Cleanup(front.Close)
	proxy := newForwardProxy(t, host, "https://"+front.Listener.Addr().String())
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: front.Certificate().Raw})
	require.NoError(t, os.WriteFile(filepath.Join(s.root, "etc/chef/corp-ca.pem"), ca, 0o644))
	s.engine, _ = newEngine(t, testenv.IMDSConfig{UserData: []byte("hostname=web01\n")}, s.root, func(c *config.Config) {
		c.Chef.ServerURL = "https://" + host
		c.Chef.TrustedCerts = "/etc/chef/corp-ca.pem"
		c.Chef.HTTPSProxy = proxy.URL
		c.Chef.ClientCommand = []string{"chefclient-ruby-standin", "--record", s.record}
		c.Chef.License = "accept-no-persist"
		c.Chef.FileCachePath = filepath.Join(s.root, "var/cache/chef")
	})

	res, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.Equal(t, chef.ResultSuccess, res.FirstRun.Result)
	seen := proxy.requests()
	connects := 0
	for _, r := range seen {
		assert.Equal(t, "CONNECT "+host, r, "every request to the server is tunnelled, and nothing else reaches the proxy")
		connects++
	}
	assert.GreaterOrEqual(t, connects, 2, "the registration's requests and chef-client's run, by client.rb's https_proxy")
	require.Len(t, s.runs(t), 1)
	assert.Equal(t, "web01", s.goiardi.Node(t, "web01").AutomaticAttributes["hostname"], "chef-client saved the node through the tunnel")
}

func TestTheLicenseKeyReachesChefClientsEnvironmentOnly(t *testing.T) {
	const key = "free-0123456789abcdef-license"
	s := newChefSetup(t, "hostname=web01\n", func(c *config.Config) { c.Chef.LicenseKeyFile = "/etc/chef/license.key" })
	keyFile := filepath.Join(s.root, "etc/chef/license.key")
	require.NoError(t, os.WriteFile(keyFile, []byte(key+"\n"), 0o600))

	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	runs := s.runs(t)
	require.Len(t, runs, 1)
	sum := sha256.Sum256([]byte(key))
	assert.Equal(t, hex.EncodeToString(sum[:]), runs[0]["license_key_sha256"], "chef-client got CHEF_LICENSE_KEY")
	assert.NotContains(t, fmt.Sprint(runs[0]["args"]), key, "never on the command line")
	for _, e := range s.logs.All() {
		assert.NotContains(t, fmt.Sprint(e.Message, e.ContextMap()), key, "never logged")
	}
	fi, err := os.Stat(filepath.Join(s.root, "run/bootagent/chef-client.env"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	require.NoError(t, os.Chmod(keyFile, 0o644))
	_, err = s.engine.Once(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "chef.license_key_file /etc/chef/license.key is readable by others (mode 0644)")

	s.engine, _ = newEngine(t, testenv.IMDSConfig{InstanceID: "i-0123456789abcdef0", UserData: []byte("hostname=web01\n")}, s.root, func(c *config.Config) {
		c.Chef.ServerURL = s.goiardi.URL
		c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin"), "--record", s.record}
	})
	_, err = s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.NotContains(t, readFile(t, filepath.Join(s.root, "run/bootagent/chef-client.env")), key, "without a key file, no key is handed on")
	assert.Empty(t, s.runs(t)[len(s.runs(t))-1]["license_key_sha256"])
}

func TestChefClientsProxiesWinOverTheEnvironmentsAndIMDSIsNeverProxied(t *testing.T) {
	const host = "chef.corp.example:4000" // resolvable only by the proxy
	// The image's own proxy, in the environment chef-client inherits:
	// nothing listens there.
	for _, v := range []string{"http_proxy", "HTTP_PROXY"} {
		t.Setenv(v, "http://127.0.0.1:9")
	}
	t.Setenv("NO_PROXY", "internal.example")
	s := newChefSetup(t, "hostname=web01\n")
	proxy := newForwardProxy(t, host, s.goiardi.URL)
	s.engine, _ = newEngine(t, testenv.IMDSConfig{UserData: []byte("hostname=web01\n")}, s.root, func(c *config.Config) {
		c.Chef.ServerURL = "http://" + host
		c.Chef.HTTPProxy = proxy.URL
		c.Chef.ClientCommand = []string{"chefclient-ruby-standin", "--record", s.record}
		c.Chef.License = "accept-no-persist"
		c.Chef.FileCachePath = filepath.Join(s.root, "var/cache/chef")
	})
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err, "chef-client took client.rb's proxy, not the environment's")
	assert.Contains(t, proxy.requests(), "PUT http://"+host+"/nodes/web01")

	// Without configured proxies, the inherited one stays, but IMDS is
	// kept off it: as chef-client (and Ohai's ec2 plugin) would decide.
	s = newChefSetup(t, "hostname=web01\n")
	_, err = s.engine.Once(context.Background())
	require.NoError(t, err, "the agent's own requests to a loopback server take no proxy")
	env := readFile(t, filepath.Join(s.root, "run/bootagent/chef-client.env"))
	assert.Contains(t, env, "NO_PROXY=internal.example,169.254.169.254,fd00:ec2::254\n", "the inherited no_proxy, with IMDS")
	script := fmt.Sprintf(`load %q
File.readlines(ARGV[0], chomp: true).each { |l| k, v = l.split("=", 2); ENV[k] = v }
chef = %%w[169.254.169.254 chef.example.org].map { |h| ChefConfig::Config.proxy_uri("http", h, 80)&.to_s }
ohai = %%w[http://169.254.169.254/ http://chef.example.org/].map { |u| URI(u).find_proxy&.to_s }
puts JSON.generate(chef + ohai)`, testenv.Tool(t, "chefclient-ruby-standin"))
	out, err := exec.Command("ruby", "-W0", "-rjson", "-e", script, filepath.Join(s.root, "run/bootagent/chef-client.env")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.JSONEq(t, `[null, "http://127.0.0.1:9", null, "http://127.0.0.1:9"]`, string(out),
		"IMDS direct, the rest through the image's proxy, by ChefConfig's proxy_uri (chef-client) and Net::HTTP's (Ohai's ec2 plugin)")
}

func TestWithExecFalseTheNodeIsRegisteredAndNothingRun(t *testing.T) {
	s := newChefSetup(t, "#cloud-config\nhostname: web01\nchef:\n  exec: false\n")
	res, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.Nil(t, res.FirstRun, "no first run")
	assert.Empty(t, s.runs(t))
	assert.NotEmpty(t, s.goiardi.Clients(t)["web01"], "registered")
	for _, f := range []string{"etc/chef/client.rb", "etc/chef/first-boot.json", "etc/chef/client.pem"} {
		assert.FileExists(t, filepath.Join(s.root, f), "chef-client's files are written for whoever runs it")
	}
	st, err := ReadState(s.root)
	require.NoError(t, err)
	assert.Contains(t, st.Status, "chef-client not run (chef.exec: false)")
}

func TestADaemonWithExecFalseRunsNothingEvenWhenAsked(t *testing.T) {
	d := newDaemon(t, "", func(c *config.Config) { c.Chef.Exec = false })
	d.registered(t)
	d.engine.TriggerRun()
	testenv.Eventually(t, 10*time.Second, func() bool { return d.logged("chef-client run requested, but none starts now") == 1 }, "SIGUSR1 is answered")
	d.polls(t, 2)
	assert.Empty(t, d.runs(t), "no run, first or requested")
	assert.Equal(t, PhaseIdle, d.state(t).Phase)
}

func TestCincClientRunsTheSameWay(t *testing.T) {
	bin := t.TempDir()
	require.NoError(t, os.Symlink(testenv.Tool(t, "chefclient-ruby-standin"), filepath.Join(bin, "cinc-client")))
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	s := newChefSetup(t, "hostname=web01\n")
	s.engine, _ = newEngine(t, testenv.IMDSConfig{UserData: []byte("hostname=web01\n")}, s.root, func(c *config.Config) {
		c.Chef.ServerURL = s.goiardi.URL
		c.Chef.ClientCommand = []string{"cinc-client", "--record", s.record}
		c.Chef.FileCachePath = filepath.Join(s.root, "var/cache/chef")
	})
	res, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	assert.Equal(t, chef.ResultSuccess, res.FirstRun.Result, "Cinc asks for no license, and the Ruby stand-in run as cinc-client neither")
	runs := s.runs(t)
	require.Len(t, runs, 1)
	assert.Contains(t, fmt.Sprint(runs[0]["args"]), "-c "+filepath.Join(s.root, "etc/chef/client.rb"), "Cinc reads the same client.rb")
	require.IsType(t, map[string]any{}, runs[0]["ohai"])
	assert.Equal(t, "web01", runs[0]["ohai"].(map[string]any)["hostname"], "Cinc's run saw the name through Ohai")
	for _, hint := range []string{"etc/chef/ohai/hints/ec2.json", "etc/cinc/ohai/hints/ec2.json"} {
		assert.Equal(t, "{}\n", readFile(t, filepath.Join(s.root, hint)), "Ohai's hints_path, and the one a rebranded Cinc build may read")
	}
	assert.NoDirExists(t, filepath.Join(s.root, "etc/chef/accepted_licenses"), "Cinc accepts no license")
}

func TestAJSONAttribsFileNobodyWritesIsNamedBeforeChefClientFailsOnIt(t *testing.T) {
	// cloud-init writes its first-boot file at /etc/chef/firstboot.json and
	// points json_attribs there; bootagent writes chef.firstboot_path.
	userData := "#cloud-config\nhostname: web01\nchef:\n  json_attribs: /etc/chef/firstboot.json\n  run_list: [\"recipe[base]\"]\n"
	s := newChefSetup(t, userData)
	s.goiardi.Upload(t, testenv.ChefRepo())
	mod := func(c *config.Config) {
		c.Chef.ServerURL = s.goiardi.URL
		c.Chef.ClientCommand = []string{"chefclient-ruby-standin", "--record", s.record}
		c.Chef.FileCachePath = filepath.Join(s.root, "var/cache/chef")
		c.Chef.License = "accept-no-persist"
	}
	e, _ := newEngine(t, testenv.IMDSConfig{InstanceID: "i-0123456789abcdef0", UserData: []byte(userData)}, s.root, mod)
	res, err := e.Once(context.Background())
	require.NoError(t, err, "the first run's -j wins over json_attribs, so it goes")
	assert.Equal(t, chef.ResultSuccess, res.FirstRun.Result)
	require.Len(t, s.runs(t), 1)
	_, err = e.Once(context.Background())
	require.Error(t, err, "a later run would read json_attribs")
	assert.Contains(t, err.Error(), "chef.json_attribs /etc/chef/firstboot.json")
	assert.Contains(t, err.Error(), "set chef.firstboot_path to the same path")
	assert.Len(t, s.runs(t), 1, "no chef-client is started to fail on it")

	// Given the same firstboot_path, bootagent writes the file chef-client
	// reads on every run, cloud-init's way.
	userData = "#cloud-config\nhostname: web01\nchef:\n  json_attribs: /etc/chef/firstboot.json\n  firstboot_path: /etc/chef/firstboot.json\n  run_list: [\"recipe[base]\"]\n"
	s = newChefSetup(t, userData)
	s.goiardi.Upload(t, testenv.ChefRepo())
	e, _ = newEngine(t, testenv.IMDSConfig{InstanceID: "i-0123456789abcdef0", UserData: []byte(userData)}, s.root, mod)
	for range 2 {
		res, err = e.Once(context.Background())
		require.NoError(t, err)
		assert.Equal(t, chef.ResultSuccess, res.FirstRun.Result)
	}
	runs := s.runs(t)
	require.Len(t, runs, 2)
	assert.Empty(t, runs[1]["first_boot"], "the second run has no -j")
	assert.Equal(t, filepath.Join(s.root, "etc/chef/firstboot.json"), runs[1]["json_attribs"], "it reads the file bootagent wrote, by client.rb")
	assert.Equal(t, map[string]any{"base": "1.2.0"}, runs[1]["cookbooks"])
}

func TestChefClientRefusesAnUnacceptedLicenseAndConvergesOnceItIsAccepted(t *testing.T) {
	s := newChefSetup(t, "#cloud-config\nfqdn: web01.example.internal\nchef:\n  run_list: [\"role[web]\"]\n")
	s.goiardi.Upload(t, testenv.ChefRepo())
	imdsConfig := testenv.IMDSConfig{InstanceID: "i-0123456789abcdef0", UserData: []byte("#cloud-config\nfqdn: web01.example.internal\nchef:\n  run_list: [\"role[web]\"]\n")}
	engine := func(license string) (*Engine, *observer.ObservedLogs, config.Config) {
		var cfg config.Config
		e, logs := newEngine(t, imdsConfig, s.root, func(c *config.Config) {
			c.Chef.ServerURL = s.goiardi.URL
			// The stand-in built on Chef's own Ruby libraries, its cache
			// under the root.
			c.Chef.ClientCommand = []string{"chefclient-ruby-standin", "--record", s.record}
			c.Chef.FileCachePath = filepath.Join(s.root, "var/cache/chef")
			c.Chef.License = license
			cfg = *c
		})
		return e, logs, cfg
	}

	e, logs, cfg := engine("")
	res, err := e.Once(context.Background())
	require.Error(t, err)
	require.NotNil(t, res.FirstRun)
	assert.Equal(t, chef.ResultLicenseNotAccepted, res.FirstRun.Result, "the Ruby stand-in exits 172 as chef-client does")
	failed := logs.FilterMessage("chef-client run failed").All()
	require.Len(t, failed, 1)
	assert.Contains(t, failed[0].ContextMap()["fix"], "set chef.license: accept")
	assert.Contains(t, fmt.Sprint(failed[0].ContextMap()["tail"]), "cannot execute without accepting the license")
	finding := findingNamed(t, Diagnose(context.Background(), s.root, cfg, zap.NewNop()), "chef-client license")
	assert.Equal(t, DiagWarn, finding.Result)
	assert.Contains(t, finding.Fix, "set chef.license: accept")

	// The operator follows the fix; the agent restarts with it.
	e, _, cfg = engine("accept")
	res, err = e.Once(context.Background())
	require.NoError(t, err)
	assert.Equal(t, chef.ResultSuccess, res.FirstRun.Result)
	for _, marker := range []string{"chef_infra_client", "inspec"} {
		assert.FileExists(t, filepath.Join(s.root, "etc/chef/accepted_licenses", marker), "accept persists chef-client's markers, InSpec's too")
	}
	assert.Equal(t, DiagOK, findingNamed(t, Diagnose(context.Background(), s.root, cfg, zap.NewNop()), "chef-client license").Result)

	// The server solved the run list (role[web] -> base::web) and handed
	// the node every file of the cookbook, checked by checksum.
	runs := s.runs(t)
	require.Len(t, runs, 1)
	assert.Equal(t, map[string]any{"base": "1.2.0"}, runs[0]["cookbooks"])
	for _, f := range []string{"metadata.rb", "recipes/default.rb", "recipes/web.rb", "attributes/default.rb", "templates/default/motd.erb", "files/default/issue.net"} {
		assert.Equal(t, readFile(t, filepath.Join(testenv.ChefRepo(), "cookbooks/base", f)), readFile(t, filepath.Join(s.root, "var/cache/chef/cookbooks/base", f)), f)
	}
	node := s.goiardi.Node(t, "web01.example.internal")
	assert.Equal(t, "web01", node.AutomaticAttributes["hostname"], "Ohai's hostname plugin sees the name bootagent set")
	assert.Equal(t, []any{"base::web"}, node.AutomaticAttributes["recipes"])
	assert.Equal(t, []any{"web"}, node.AutomaticAttributes["roles"])
	assert.NotContains(t, node.AutomaticAttributes, "ec2", "Ohai's ec2 plugin is never run by the tests")
}

func TestAChangedServerDoesNotRepointARegisteredNodesClientRB(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	before := readFile(t, filepath.Join(s.root, "etc/chef/client.rb"))

	other := testenv.StartGoiardi(t)
	e, logs := newEngine(t, testenv.IMDSConfig{InstanceID: "i-0123456789abcdef0", UserData: []byte("hostname=web01\n")}, s.root, func(c *config.Config) {
		c.Chef.ServerURL = other.URL
		c.Chef.ClientCommand = []string{testenv.Tool(t, "chefclient-standin"), "--record", s.record}
	})
	res, err := e.Once(context.Background())
	require.NoError(t, err, "chef-client still runs against the server the node is on")
	assert.Equal(t, chef.ResultSuccess, res.FirstRun.Result)
	assert.Equal(t, before, readFile(t, filepath.Join(s.root, "etc/chef/client.rb")))
	warned := logs.FilterMessageSnippet("client.rb keeps the registration's").All()
	require.Len(t, warned, 1)
	assert.Contains(t, warned[0].ContextMap()["fix"], "bootagent deregister and bootagent clean")
}

func findingNamed(t *testing.T, d Diagnosis, name string) Finding {
	t.Helper()
	for _, f := range d {
		if f.Name == name {
			return f
		}
	}
	t.Fatalf("diagnose has no %q finding: %+v", name, d)
	return Finding{}
}

func TestAFirstBootMakesTheKeyWhileIMDSIsRead(t *testing.T) {
	for _, tt := range []struct {
		name     string
		key      bool   // the node's key is on disk
		previous string // the instance the state names
		ahead    bool
	}{
		{name: "first boot", ahead: true},
		{name: "restart of a registered instance", key: true, previous: "i-0123456789abcdef0"},
		{name: "a new instance from an image with another's state", key: true, previous: "i-0aaaaaaaaaaaaaaaa", ahead: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newChefSetup(t, "hostname=web01\n")
			if tt.key {
				require.NoError(t, os.WriteFile(filepath.Join(s.root, "etc/chef/client.pem"), []byte("an old key"), 0o600))
			}
			b, err := s.engine.bootstrap(context.Background(), s.engine.metadata(s.engine.cfg), s.engine.cfg, tt.previous, func(event) {})
			require.NoError(t, err)
			require.NotNil(t, b.plan.chef)
			if !tt.ahead {
				assert.Nil(t, b.plan.chef.key, "the key on disk is the node's")
				return
			}
			require.NotNil(t, b.plan.chef.key)
			again, err := s.engine.bootstrap(context.Background(), s.engine.metadata(s.engine.cfg), s.engine.cfg, tt.previous, func(event) {})
			require.NoError(t, err)
			assert.Same(t, b.plan.chef.key, again.plan.chef.key, "a bootstrap tried again makes no second key")
			ahead, err := b.plan.chef.key.take()
			require.NoError(t, err)
			_, err = s.engine.register(context.Background(), zap.NewNop(), b.plan.cfg, b.plan.chef, nil)
			require.NoError(t, err)
			assert.Equal(t, string(ahead), readFile(t, filepath.Join(s.root, "etc/chef/client.pem")), "the registration took the key made ahead")
		})
	}
}
