package chef

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/internal/testenv"
)

func baseClientConfig() ClientConfig {
	return ClientConfig{
		ServerURL:    "https://chef.example.com/organizations/acme",
		NodeName:     "web01.example.internal",
		ClientKey:    "/etc/chef/client.pem",
		SSLVerify:    true,
		AuthProtocol: "1.3",
		Environment:  "production",
		// config's defaults
		FileCachePath:  "/var/cache/chef",
		FileBackupPath: "/var/backups/chef",
	}
}

func TestRenderClientRB(t *testing.T) {
	got, err := RenderClientRB(baseClientConfig())
	require.NoError(t, err)
	for _, line := range []string{
		"chef_server_url                  'https://chef.example.com/organizations/acme'\n",
		"node_name                        'web01.example.internal'\n",
		"client_key                       '/etc/chef/client.pem'\n",
		"ssl_verify_mode                  :verify_peer\n",
		"trusted_certs_dir                '/etc/chef/trusted_certs'\n",
		"authentication_protocol_version  '1.3'\n",
		"environment                      'production'\n",
		"file_cache_path                  '/var/cache/chef'\n",
		"log_location                     STDOUT\n",
	} {
		assert.Contains(t, string(got), line)
	}
	assert.NotContains(t, string(got), "validation", "the node never needs the validator again")

	c := baseClientConfig()
	c.SSLVerify, c.Environment, c.PolicyName, c.PolicyGroup, c.CAFile = false, "", "web", "prod", "/etc/bootagent/chef-ca.pem"
	got, err = RenderClientRB(c)
	require.NoError(t, err)
	assert.Contains(t, string(got), "ssl_verify_mode                  :verify_none\n")
	assert.Contains(t, string(got), "policy_name                      'web'\npolicy_group                     'prod'\n")
	assert.Contains(t, string(got), "ssl_ca_file                      '/etc/bootagent/chef-ca.pem'\n")
	assert.NotContains(t, string(got), "environment")
}

// injections are values an attacker controlling user-data or a careless
// operator might put in a setting that ends up in client.rb.
var injections = []string{
	`it's`,
	`back\slash\`,
	`\'; system("id"); '`,
	`#{system("id")}`,
	"`id`",
	`$(id)`,
	`%x(id)`,
	`"; exit 1; "`,
	`__END__`,
	`=begin`,
	`ünïcödé ✓`,
	strings.Repeat("a", 4096),
}

// rubyEval reads client.rb the way chef-client does, with Ruby itself, and
// returns every setting it made.
func rubyEval(t *testing.T, path string) map[string]string {
	t.Helper()
	const script = `o = Object.new; h = {}
o.define_singleton_method(:method_missing) { |n, *a| h[n.to_s] = a[0].to_s }
o.instance_eval(File.read(ARGV[0]), ARGV[0])
puts JSON.generate(h)`
	var settings map[string]string
	rubyJSON(t, script, path, &settings)
	return settings
}

// rubyJSON runs a Ruby script on path and decodes the JSON it prints.
func rubyJSON(t *testing.T, script, path string, out any) {
	t.Helper()
	got, err := exec.Command(testenv.Tool(t, "ruby"), "-rjson", "-e", script, path).CombinedOutput()
	require.NoError(t, err, "Ruby refused the file:\n%s", got)
	require.NoError(t, json.Unmarshal(got, out), "%s", got)
}

func TestRenderClientRBKeepsHostileValuesInertForRuby(t *testing.T) {
	dir := t.TempDir()
	for i, v := range injections {
		c := baseClientConfig()
		c.ServerURL = "https://chef.example.com/" + v
		c.ClientKey = "/etc/chef/" + v
		c.CAFile = v
		c.EncryptedDataBagSecret, c.PIDFile, c.FileCachePath = "/etc/chef/"+v, "/run/"+v, "/var/cache/"+v
		c.License, c.LogLevel = "accept", "warn"
		got, err := RenderClientRB(c)
		require.NoError(t, err, "value %q", v)

		path := filepath.Join(dir, "client.rb")
		require.NoError(t, os.WriteFile(path, got, 0o600))
		out, err := exec.Command(testenv.Tool(t, "ruby"), "-c", path).CombinedOutput()
		require.NoError(t, err, "ruby -c refused the file for value %d %q:\n%s\n%s", i, v, out, got)

		settings := rubyEval(t, path)
		assert.Equal(t, c.ServerURL, settings["chef_server_url"], "value %d read back by Ruby", i)
		assert.Equal(t, c.ClientKey, settings["client_key"])
		assert.Equal(t, c.CAFile, settings["ssl_ca_file"])
		assert.Equal(t, "verify_peer", settings["ssl_verify_mode"])
		assert.Equal(t, c.EncryptedDataBagSecret, settings["encrypted_data_bag_secret"])
		assert.Equal(t, c.PIDFile, settings["pid_file"])
		assert.Equal(t, c.FileCachePath, settings["file_cache_path"])
		assert.Equal(t, "accept", settings["chef_license"])
		assert.Equal(t, "warn", settings["log_level"])
	}
}

func TestRenderClientRBRefusesWhatRubyCannotHoldSafely(t *testing.T) {
	for _, v := range []string{"a\nb", "a\rb", "nul\x00", "bell\a", "del\x7f", "bad\xffutf8"} {
		c := baseClientConfig()
		c.ServerURL = "https://chef.example.com/" + v
		_, err := RenderClientRB(c)
		require.ErrorIs(t, err, ErrInvalid, "value %q", v)
		assert.Contains(t, err.Error(), "client.rb chef_server_url")
	}
	c := baseClientConfig()
	c.NodeName = "web'01"
	_, err := RenderClientRB(c)
	require.ErrorIs(t, err, ErrInvalid)
}

// FuzzRenderClientRB checks that any value either is refused or renders
// into single-quoted literals that read back to the value, one per line.
func FuzzRenderClientRB(f *testing.F) {
	for _, v := range injections {
		f.Add(v, "production")
	}
	f.Fuzz(func(t *testing.T, value, env string) {
		c := baseClientConfig()
		c.ServerURL, c.ClientKey, c.Environment = value, value, env
		out, err := RenderClientRB(c)
		if err != nil {
			return
		}
		for _, line := range strings.Split(strings.TrimSuffix(string(out), "\n"), "\n") {
			if strings.HasPrefix(line, "#") {
				continue
			}
			key, lit, ok := strings.Cut(line, " ")
			lit = strings.TrimSpace(lit)
			if !ok || key == "" {
				t.Fatalf("malformed line %q", line)
			}
			if strings.HasPrefix(lit, ":") || lit == "STDOUT" {
				continue
			}
			got, ok := unquoteRuby(lit)
			if !ok {
				t.Fatalf("%s: %q is not one single-quoted literal", key, lit)
			}
			if (key == "chef_server_url" || key == "client_key") && got != value {
				t.Fatalf("%s reads back as %q, not %q", key, got, value)
			}
		}
	})
}

// unquoteRuby reads one single-quoted Ruby literal, as Ruby does.
func unquoteRuby(lit string) (string, bool) {
	if len(lit) < 2 || lit[0] != '\'' || lit[len(lit)-1] != '\'' {
		return "", false
	}
	var b strings.Builder
	body := lit[1 : len(lit)-1]
	for i := 0; i < len(body); i++ {
		switch {
		case body[i] == '\\' && i+1 < len(body) && (body[i+1] == '\\' || body[i+1] == '\''):
			b.WriteByte(body[i+1])
			i++
		case body[i] == '\'':
			return "", false // an unescaped quote ends the literal early
		default:
			b.WriteByte(body[i])
		}
	}
	return b.String(), true
}

func TestRenderFirstBoot(t *testing.T) {
	got, err := RenderFirstBoot(FirstBoot{RunList: []string{"role[web]"}, Attributes: map[string]any{"nginx": map[string]any{"workers": 4}}})
	require.NoError(t, err)
	assert.JSONEq(t, `{"run_list": ["role[web]"], "nginx": {"workers": 4}}`, string(got))

	got, err = RenderFirstBoot(FirstBoot{PolicyName: "web", PolicyGroup: "prod"})
	require.NoError(t, err)
	assert.JSONEq(t, `{"policy_name": "web", "policy_group": "prod"}`, string(got))

	_, err = RenderFirstBoot(FirstBoot{Attributes: map[string]any{"run_list": []any{"recipe[evil]"}}})
	require.ErrorIs(t, err, ErrInvalid)
}

func TestExpandNodeName(t *testing.T) {
	vars := NameVars{FQDN: "web01.example.internal", Hostname: "web01", InstanceID: "i-0abc", Region: "eu-west-1"}
	tests := []struct {
		tmpl, want, wantErr string
	}{
		{tmpl: "{fqdn}", want: "web01.example.internal"},
		{tmpl: "{hostname}-{instance_id}", want: "web01-i-0abc"},
		{tmpl: "{region}.{hostname}", want: "eu-west-1.web01"},
		{tmpl: "fixed-name", want: "fixed-name"},
		{tmpl: "{host}", wantErr: "unknown placeholder {host}"},
		{tmpl: "web 01", wantErr: `node name "web 01"`},
		{tmpl: "{hostname}'; x", wantErr: "node name"},
	}
	for _, tt := range tests {
		t.Run(tt.tmpl, func(t *testing.T) {
			got, err := ExpandNodeName(tt.tmpl, vars)
			if tt.wantErr != "" {
				require.ErrorIs(t, err, ErrInvalid)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestNormalizeRunList(t *testing.T) {
	got, err := NormalizeRunList([]string{"base", "recipe[nginx::default@1.2.0]", "role[web]"})
	require.NoError(t, err)
	assert.Equal(t, []string{"recipe[base]", "recipe[nginx::default@1.2.0]", "role[web]"}, got)
	for _, bad := range []string{"role[web", "recipe[a b]", "role['x']", "policy[x]", "", "recipe[#{x}]"} {
		_, err := NormalizeRunList([]string{bad})
		assert.ErrorIs(t, err, ErrInvalid, "item %q", bad)
	}
}

func TestNormalizeKeyPEM(t *testing.T) {
	keyPEM, err := GenerateKey()
	require.NoError(t, err)
	mangled := strings.ReplaceAll(string(keyPEM), "\n", " ")
	got, err := NormalizeKeyPEM(mangled)
	require.NoError(t, err)
	assert.Equal(t, string(keyPEM), string(got), "newlines turned into spaces are repaired")

	indented := "  " + strings.ReplaceAll(string(keyPEM), "\n", "\n    ")
	got, err = NormalizeKeyPEM(indented)
	require.NoError(t, err)
	assert.Equal(t, string(keyPEM), string(got))

	for _, bad := range []string{"not a key", "-----BEGIN RSA PRIVATE KEY----- !!! -----END RSA PRIVATE KEY-----", "-----BEGIN RSA PRIVATE KEY----- aGVsbG8= -----END RSA PRIVATE KEY-----", "-----BEGIN A----- aGVsbG8= -----END B-----"} {
		_, err := NormalizeKeyPEM(bad)
		assert.ErrorIs(t, err, ErrInvalid, "input %q", bad)
	}
}

func TestRenderClientRBWritesChefClientsOwnSettings(t *testing.T) {
	c := baseClientConfig()
	c.License, c.EncryptedDataBagSecret, c.LogLevel, c.PIDFile = "accept-no-persist", "/etc/chef/encrypted_data_bag_secret", "info", "/run/chef/client.pid"
	c.FileCachePath, c.FileBackupPath = "/srv/chef/cache", "/srv/chef/backup"
	got, err := RenderClientRB(c)
	require.NoError(t, err)
	for _, line := range []string{
		"chef_license                     'accept-no-persist'\n",
		"encrypted_data_bag_secret        '/etc/chef/encrypted_data_bag_secret'\n",
		"log_level                        :info\n",
		"pid_file                         '/run/chef/client.pid'\n",
		"file_cache_path                  '/srv/chef/cache'\n",
		"file_backup_path                 '/srv/chef/backup'\n",
	} {
		assert.Contains(t, string(got), line)
	}

	c = baseClientConfig()
	got, err = RenderClientRB(c)
	require.NoError(t, err)
	for _, unset := range []string{"chef_license", "encrypted_data_bag_secret", "log_level", "pid_file"} {
		assert.NotContains(t, string(got), unset, "unset, chef-client's default holds")
	}

	c = baseClientConfig()
	c.LogLevel = "info\nsystem('id')"
	_, err = RenderClientRB(c)
	var se *SettingError
	require.ErrorAs(t, err, &se, "a log level is written as a symbol, so only a word is one")
	assert.Equal(t, "log_level", se.Setting)
}

// chefConfigLoad loads client.rb the way chef-client does, with the Ruby
// stand-in's load_config (Chef's own ChefConfig::WorkstationConfigLoader,
// from Debian's ruby-chef-config, with Chef::Log loaded), and returns the
// settings bootagent writes as chef-client reads them.
func chefConfigLoad(t *testing.T, path string) map[string]any {
	t.Helper()
	script := fmt.Sprintf(`load %q
load_config(ARGV[0])
c = ChefConfig::Config
keys = %%w[chef_server_url node_name client_key ssl_verify_mode trusted_certs_dir ssl_ca_file authentication_protocol_version
  environment policy_name policy_group file_cache_path file_backup_path encrypted_data_bag_secret pid_file chef_license
  log_level log_location http_proxy https_proxy no_proxy json_attribs]
settings = keys.to_h { |k| v = c[k.to_sym]; [k, v.is_a?(Symbol) ? ":#{v}" : (v.is_a?(IO) ? "STDOUT" : v)] }
settings["show_time"] = Mixlib::Log::Formatter.class_variable_get(:@@show_time)
puts JSON.generate(settings)`, testenv.Tool(t, "chefclient-ruby-standin"))
	var settings map[string]any
	rubyJSON(t, script, path, &settings)
	return settings
}

func TestChefClientReadsEveryClientRBAsMeant(t *testing.T) {
	dir := t.TempDir()
	full := baseClientConfig()
	full.CAFile, full.License, full.EncryptedDataBagSecret, full.LogLevel, full.PIDFile = "/etc/chef/ca.pem", "accept-silent", "/etc/chef/secret", "debug", "/run/chef/client.pid"
	full.Proxies = Proxies{HTTP: "http://proxy.corp:3128", HTTPS: "http://proxy.corp:3129", No: "corp.example"}
	full.JSONAttribs, full.ShowTime = "/etc/chef/first-boot.json", new(false)
	policy := full
	policy.Environment, policy.PolicyName, policy.PolicyGroup, policy.SSLVerify = "", "webapp", "prod", false
	configs := []ClientConfig{baseClientConfig(), full, policy}
	for _, v := range injections {
		c := full
		c.ServerURL, c.ClientKey, c.EncryptedDataBagSecret, c.Proxies.No = "https://chef.example.com/"+v, "/etc/chef/"+v, "/etc/chef/"+v, v
		c.JSONAttribs, c.CAFile, c.PIDFile = "/etc/chef/"+v, "/etc/chef/"+v, "/run/"+v
		c.FileCachePath, c.FileBackupPath = "/var/cache/"+v, "/var/backups/"+v
		c.License = v
		configs = append(configs, c)
	}
	for i, c := range configs {
		got, err := RenderClientRB(c)
		require.NoError(t, err)
		path := filepath.Join(dir, "client.rb")
		require.NoError(t, os.WriteFile(path, got, 0o600))
		s := chefConfigLoad(t, path)
		want := map[string]any{
			"chef_server_url": c.ServerURL, "node_name": c.NodeName, "client_key": c.ClientKey,
			"ssl_verify_mode": ":verify_peer", "authentication_protocol_version": c.AuthProtocol,
			"file_cache_path": c.FileCachePath, "file_backup_path": c.FileBackupPath,
			"trusted_certs_dir": "/etc/chef/trusted_certs", "log_location": "STDOUT",
		}
		if !c.SSLVerify {
			want["ssl_verify_mode"] = ":verify_none"
		}
		if c.PolicyName != "" {
			want["policy_name"], want["policy_group"] = c.PolicyName, c.PolicyGroup
		} else {
			want["environment"] = c.Environment
		}
		if c.License != "" {
			want["chef_license"] = c.License
			want["encrypted_data_bag_secret"] = c.EncryptedDataBagSecret
			want["log_level"] = ":" + c.LogLevel
			want["pid_file"] = c.PIDFile
			want["ssl_ca_file"] = c.CAFile
			want["http_proxy"], want["https_proxy"] = c.Proxies.HTTP, c.Proxies.HTTPS
			want["no_proxy"] = c.Proxies.noProxy()
			want["json_attribs"] = c.JSONAttribs
			want["show_time"] = false
		} else {
			want["show_time"] = true // Mixlib::Log's default, untouched
		}
		for k, v := range want {
			assert.Equal(t, v, s[k], "config %d: chef-client reads %s as bootagent meant", i, k)
		}
	}
}

func TestChefClientReadsTheImagesClientDAfterClientRB(t *testing.T) {
	dir := t.TempDir()
	c := baseClientConfig()
	c.LogLevel = "info"
	got, err := RenderClientRB(c)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "client.rb"), got, 0o600))
	require.NoError(t, os.Mkdir(filepath.Join(dir, "client.d"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "client.d", "10-image.rb"), []byte("log_level :warn\nfile_cache_path '/srv/chef/cache'\n"), 0o644))
	s := chefConfigLoad(t, filepath.Join(dir, "client.rb"))
	assert.Equal(t, ":warn", s["log_level"], "a setting of the image's client.d wins over client.rb's, as in chef-client")
	assert.Equal(t, "/srv/chef/cache", s["file_cache_path"])
	assert.Equal(t, c.ServerURL, s["chef_server_url"], "client.rb's other settings stay")
}

func TestANoProxyAloneIsWrittenWithTheIMDSAddresses(t *testing.T) {
	c := baseClientConfig()
	c.Proxies = Proxies{No: "corp.example"}
	got, err := RenderClientRB(c)
	require.NoError(t, err)
	assert.Contains(t, string(got), "no_proxy                         'corp.example,169.254.169.254,fd00:ec2::254'\n")
	assert.NotContains(t, string(got), "http_proxy")
}

func TestShowTimeIsWrittenSoThatChefClientTurnsTheTimeOff(t *testing.T) {
	dir := t.TempDir()
	c := baseClientConfig()
	c.ShowTime = new(false)
	got, err := RenderClientRB(c)
	require.NoError(t, err)
	ours := filepath.Join(dir, "client.rb")
	require.NoError(t, os.WriteFile(ours, got, 0o600))
	assert.Equal(t, false, chefConfigLoad(t, ours)["show_time"])

	// cloud-init's line, read by Chef's own Chef::Log, leaves the time on.
	theirs := filepath.Join(dir, "cloud-init.rb")
	require.NoError(t, os.WriteFile(theirs, append(got, "Chef::Log::Formatter.show_time = false\n"...), 0o600))
	assert.Equal(t, []any{false}, chefConfigLoad(t, theirs)["show_time"], "an argument list, which Ruby takes as true")
}
