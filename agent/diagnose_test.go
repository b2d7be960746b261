package agent

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/internal/testenv"
)

// registeredForDiagnosis registers an instance and returns the config a
// diagnosis reads, pointed at IMDS and the Chef server through mod.
func registeredForDiagnosis(t *testing.T) (*chefSetup, config.Config) {
	s := newChefSetup(t, "hostname=web01\nchef_run_list=role[web]\n")
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	cfg := s.engine.cfg
	return s, cfg
}

func findings(d Diagnosis) map[string]Finding {
	out := map[string]Finding{}
	for _, f := range d {
		out[f.Name] = f
	}
	return out
}

func TestDiagnoseAWorkingSetup(t *testing.T) {
	s, cfg := registeredForDiagnosis(t)
	d := Diagnose(context.Background(), s.root, cfg, zaptest.NewLogger(t))
	var out strings.Builder
	require.NoError(t, d.WriteText(&out))
	assert.False(t, d.Failed(), "\n%s", out.String())
	f := findings(d)
	for _, name := range []string{"IMDS reachable", "IMDSv1", "IMDSv2 token", "user-data", "Chef server", "clock skew", "client key", "chef-client"} {
		assert.Equal(t, DiagOK, f[name].Result, "%s: %s", name, f[name].Detail)
	}
	assert.Equal(t, "disabled: IMDSv2 only", f["IMDSv1"].Detail)
	assert.Contains(t, f["user-data"].Detail, "key=value, sets hostname.name, chef.run_list")
	assert.Contains(t, f["client key"].Detail, "accepts /etc/chef/client.pem for client web01")
	assert.Equal(t, DiagSkip, f["hostname -f"].Result, "--root")
	assert.Equal(t, DiagSkip, f["units"].Result, "--root")
}

func TestDiagnoseAHangingTokenRequest(t *testing.T) {
	s, cfg := registeredForDiagnosis(t)
	p := newOverridingProxy(t, cfg.IMDS.Endpoint)
	p.set("PUT /latest/api/token", func(_ http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
	})
	cfg.IMDS.Endpoint = p.URL
	d := Diagnose(context.Background(), s.root, cfg, zaptest.NewLogger(t))
	require.True(t, d.Failed())
	f := findings(d)
	assert.Equal(t, DiagOK, f["IMDS reachable"].Result, "plain GETs get an answer")
	assert.Equal(t, DiagFail, f["IMDSv2 token"].Result)
	assert.Contains(t, f["IMDSv2 token"].Detail, "the hop-limit problem")
	assert.Equal(t, "aws ec2 modify-instance-metadata-options --instance-id ID --http-put-response-hop-limit 2", f["IMDSv2 token"].Fix)
}

func TestDiagnoseAChefServerWithASkewedClock(t *testing.T) {
	s, cfg := registeredForDiagnosis(t)
	// A proxy that moves the server's Date 20 minutes ahead: goiardi's own
	// clock is this machine's.
	u, err := url.Parse(s.goiardi.URL)
	require.NoError(t, err)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(res *http.Response) error {
		res.Header.Set("Date", time.Now().Add(20*time.Minute).UTC().Format(http.TimeFormat))
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	cfg.Chef.ServerURL = srv.URL
	d := Diagnose(context.Background(), s.root, cfg, zaptest.NewLogger(t))
	require.True(t, d.Failed())
	skew := findings(d)["clock skew"]
	assert.Equal(t, DiagFail, skew.Result)
	// The Date header counts whole seconds.
	assert.Regexp(t, `^this clock is (19m59s|20m0s) off the Chef server's`, skew.Detail)
	assert.Contains(t, skew.Fix, "time sync")
}

func TestDiagnoseARevokedClient(t *testing.T) {
	s, cfg := registeredForDiagnosis(t)
	require.NoError(t, s.goiardi.Admin.Clients.Delete("web01"))
	d := Diagnose(context.Background(), s.root, cfg, zaptest.NewLogger(t))
	require.True(t, d.Failed())
	key := findings(d)["client key"]
	assert.Equal(t, DiagFail, key.Result)
	assert.Contains(t, key.Detail, `the server refuses /etc/chef/client.pem for client "web01" (HTTP 401)`)
	assert.Contains(t, key.Fix, "bootagent clean")
}

func TestDiagnoseWithoutIMDS(t *testing.T) {
	testenv.RequirePrivateNetwork(t)
	cfg := config.Default()
	cfg.IMDS.Endpoint = "http://127.0.0.1:9" // Nothing listens on discard.
	d := Diagnose(context.Background(), t.TempDir(), cfg, zaptest.NewLogger(t))
	require.True(t, d.Failed())
	f := findings(d)
	assert.Equal(t, DiagFail, f["IMDS reachable"].Result)
	assert.Contains(t, f["IMDS reachable"].Detail, "connection refused")
	assert.Equal(t, DiagSkip, f["Chef server"].Result)
}

func TestDiagnoseSaysWhetherTheLicenseIsAccepted(t *testing.T) {
	root := t.TempDir()
	cfg := config.Default()
	assert.Equal(t, DiagWarn, checkLicense(root, cfg, "").Result, "nothing accepts it")
	assert.Contains(t, checkLicense(root, cfg, "").Fix, "set chef.license: accept")

	assert.Equal(t, DiagOK, checkLicense(root, cfg, "accept-no-persist").Result, "CHEF_LICENSE")
	got := checkLicense(root, cfg, "yes")
	assert.Equal(t, DiagWarn, got.Result, "chef-client accepts only its own values")
	assert.Contains(t, got.Detail, "CHEF_LICENSE=yes in systemd's environment accepts nothing")
	cfg.Chef.License = "accept"
	assert.Contains(t, checkLicense(root, cfg, "").Detail, "chef.license: accept")
	cfg.Chef.License = ""

	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc/chef/accepted_licenses"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/chef/accepted_licenses/inspec"), []byte("---\nid: inspec\n"), 0o644))
	assert.Equal(t, DiagWarn, checkLicense(root, cfg, "").Result, "another product's acceptance is not chef-client's")
	require.NoError(t, os.Remove(filepath.Join(root, "etc/chef/accepted_licenses/inspec")))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/chef/accepted_licenses/chef_infra_client"), []byte("---\nid: infra-client\n"), 0o644))
	got = checkLicense(root, cfg, "")
	assert.Equal(t, DiagWarn, got.Result, "chef-client's license-acceptance wants its child product's (InSpec's) marker too")
	assert.Contains(t, got.Detail, "/etc/chef/accepted_licenses/inspec is missing")
	require.NoError(t, os.Symlink("chef_infra_client", filepath.Join(root, "etc/chef/accepted_licenses/inspec")))
	got = checkLicense(root, cfg, "")
	assert.Equal(t, DiagOK, got.Result, "any file that exists is a marker, as for license-acceptance's File.exist?")
	assert.Contains(t, got.Detail, "accepted on the image (/etc/chef/accepted_licenses/chef_infra_client and inspec)")

	require.NoError(t, os.RemoveAll(filepath.Join(root, "etc/chef/accepted_licenses")))
	for _, command := range [][]string{{"chef-client", "--chef-license", "accept"}, {"chef-client", "--chef-license=accept-silent"}} {
		cfg.Chef.ClientCommand = command
		got = checkLicense(root, cfg, "")
		assert.Equal(t, DiagOK, got.Result, "%q accepts on chef-client's command line", command)
		assert.Contains(t, got.Detail, "chef.client_command")
	}
	cfg.Chef.ClientCommand = []string{"chef-client", "--chef-license", "ACCEPT"}
	assert.Equal(t, DiagOK, checkLicense(root, cfg, "").Result, "license-acceptance compares without case")
	assert.Equal(t, DiagOK, checkLicense(root, config.Default(), "Accept-No-Persist").Result, "CHEF_LICENSE too")
	cfg.Chef.ClientCommand = []string{"chef-client", "--chef-license", "maybe"}
	assert.Equal(t, DiagWarn, checkLicense(root, cfg, "").Result, "only chef-client's own values accept")

	cfg.Chef.ClientCommand = []string{"/opt/cinc/bin/cinc-client"}
	assert.Equal(t, DiagSkip, checkLicense(t.TempDir(), cfg, "").Result, "Cinc has no license")

	cfg = config.Default()
	cfg.Chef.Exec = false
	assert.Equal(t, DiagSkip, checkLicense(t.TempDir(), cfg, "").Result, "no chef-client is run, so no license is needed")
}

func TestDiagnoseNamesAMissingChefClient(t *testing.T) {
	cfg := config.Default()
	cfg.Chef.ClientCommand = []string{"/nonexistent/chef-client", "--no-fork"}
	got := checkChefClient(cfg)
	assert.Equal(t, DiagFail, got.Result)
	assert.Contains(t, got.Detail, `chef.client_command "/nonexistent/chef-client" is not on this machine`)
	assert.Equal(t, chef.NotInstalledFix, got.Fix, "the fix says the image must carry it")

	cfg.Chef.Exec = false
	got = checkChefClient(cfg)
	assert.Equal(t, DiagSkip, got.Result, "with chef.exec false no chef-client is run, so a missing one is no fault")
}
