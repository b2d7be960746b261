package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLoadAMissingDefaultFileGivesTheDefaults(t *testing.T) {
	cfg, err := Load(filepath.Join(t.TempDir(), "config.yaml"), true)
	require.NoError(t, err)
	assert.Equal(t, 6*time.Hour, cfg.IMDS.TokenTTL.D())
	assert.Equal(t, FallbackIMDS, cfg.Hostname.Fallback)
	assert.True(t, cfg.Hostname.PreferFQDN)
	assert.False(t, cfg.Chef.Enabled(), "no server_url, no Chef steps")
}

func TestLoadAMissingNamedFileIsAnError(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"), false)
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestParseOverridesOnlyWhatTheFileSays(t *testing.T) {
	cfg, err := Parse([]byte(`
imds:
  token_ttl: 1h
  wait_timeout: 2m
hostname:
  domain: example.internal
  from_tag: Name
chef:
  server_url: https://chef.example.com/organizations/acme
  run_list: ["role[base]"]
  initial_attributes:
    app: {port: 8080, tags: [a, b]}
`), "config test.yaml")
	require.NoError(t, err)
	assert.Equal(t, time.Hour, cfg.IMDS.TokenTTL.D())
	assert.Equal(t, 2*time.Minute, cfg.IMDS.WaitTimeout.D())
	assert.Equal(t, 5*time.Second, cfg.IMDS.PollInterval.D(), "untouched default")
	assert.Equal(t, "example.internal", cfg.Hostname.Domain)
	assert.Equal(t, []string{"role[base]"}, cfg.Chef.RunList)
	assert.Equal(t, Object{"app": map[string]any{"port": 8080, "tags": []any{"a", "b"}}}, cfg.Chef.InitialAttributes)
	assert.Equal(t, "config test.yaml line 4", cfg.Source("imds.wait_timeout"))
	assert.Equal(t, "default imds.poll_interval", cfg.Source("imds.poll_interval"))
}

func TestParseRefusesBadFiles(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want string
	}{
		{"an unknown key names its line and section", "imds:\n  token_tll: 1h\n", `config f: line 2: unknown key "token_tll" in imds`},
		{"an unknown section names its line", "hostnmae:\n  domain: x\n", `config f: line 1: unknown key "hostnmae" at the top level`},
		{"a bad duration names its line", "chef:\n  interval: soon\n", `line 2: "soon" is not a duration`},
		{"a value of the wrong type names its line", "hostname:\n  prefer_fqdn: [1]\n", "line 2: cannot unmarshal !!seq into bool"},
		{"two documents are refused, naming the line of the second", "imds: {}\n---\nimds: {}\n", "config f: line 2: more than one YAML document (the second starts here); keep one"},
		{"a token TTL IMDS would not grant", "imds:\n  token_ttl: 7h\n", "config f line 2: imds.token_ttl: 7h0m0s is outside what IMDS grants"},
		{"an endpoint mode the SDK does not know", "imds:\n  endpoint_mode: dual\n", `config f line 2: imds.endpoint_mode: "dual" is not ipv4 or ipv6`},
		{"a user that is not a name", "imds:\n  allow_users: [root, \"a b\"]\n", `config f line 2: imds.allow_users: "a b" is not a user name or a uid`},
		{"the uid that means no user", "imds:\n  allow_users: [\"4294967295\"]\n", `imds.allow_users: "4294967295" is not a user name or a uid`},
		{"a filtered endpoint named by its host name", "imds:\n  endpoint: http://imds.internal\n  allow_users: [root]\n", `imds.endpoint: "http://imds.internal" names its host by name, and imds.allow_users filters IMDS by address`},
		{"an unknown fallback", "hostname:\n  fallback: random\n", `hostname.fallback: "random" is not one of imds, keep`},
		{"a tag key IMDS cannot serve", "hostname:\n  from_tag: a/b\n", `hostname.from_tag: "a/b" is not a tag key`},
		{"a server URL without scheme", "chef:\n  server_url: chef.example.com\n", "chef.server_url: \"chef.example.com\" must start with http:// or https://"},
		{"a policy without its group", "chef:\n  policy_name: web\n", "policy_name and policy_group go together"},
		{"a policy with a run list", "chef:\n  policy_name: web\n  policy_group: prod\n  run_list:\n    - recipe[x]\n", "drop run_list"},
		{"a relative key path", "chef:\n  client_key: client.pem\n", `chef.client_key: "client.pem" must be an absolute path`},
		{"an empty client command", "chef:\n  client_command: []\n", "chef.client_command: must name a program"},
		{"attributes with a non-string key", "chef:\n  initial_attributes:\n    1: x\n", "attribute key 1 at chef.initial_attributes is not a string"},
		{"attributes that JSON cannot carry", "chef:\n  initial_attributes:\n    x: .nan\n", "config f: line 3: chef.initial_attributes.x: .nan is not a finite number (JSON cannot carry it)"},
		{"attributes with an infinite number", "chef:\n  initial_attributes:\n    a: {x: .inf}\n", "config f: line 3: chef.initial_attributes.a.x: .inf is not a finite number"},
		{"attributes with a number too large to be finite", "chef:\n  initial_attributes:\n    x: 1e999\n", "config f: line 3: chef.initial_attributes.x: 1e999 is not a finite number"},
		{"attributes with a tagged float too large to be finite", "chef:\n  initial_attributes:\n    x: !!float 1e999\n", "config f: line 3: chef.initial_attributes.x: 1e999 is not a finite number"},
		{"attributes with a key given twice", "chef:\n  initial_attributes:\n    x: 1\n    x: 2\n", "config f: line 4: chef.initial_attributes.x: given twice (first on line 3)"},
		{"a metrics listener that is not host:port", "metrics:\n  listen: localhost\n", `metrics.listen: "localhost" is not host:port`},
		{"a metrics listener on every interface", "metrics:\n  listen: 0.0.0.0:9469\n", `metrics.listen: "0.0.0.0:9469" is not a loopback address`},
		{"a metrics listener on another address", "metrics:\n  listen: 10.0.0.5:9469\n", "set metrics.allow_remote: true"},
		{"a textfile node_exporter would not read", "metrics:\n  textfile: /var/lib/node_exporter/bootagent.txt\n", "must be an absolute path ending in .prom"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml), "config f")
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrInvalid)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestTheFilteredEndpointIsTheConfiguredOnesAddressAndPort(t *testing.T) {
	tests := map[string]string{
		"http://127.0.0.1:8080":     "127.0.0.1:8080",
		"http://[::1]:1338/":        "[::1]:1338",
		"http://169.254.169.254":    "169.254.169.254:80",
		"https://[fd00:ec2::254]":   "[fd00:ec2::254]:443",
		"http://[::ffff:127.0.0.1]": "127.0.0.1:80",
	}
	for endpoint, want := range tests {
		ep, ok := IMDS{Endpoint: endpoint}.EndpointAddr()
		require.True(t, ok, endpoint)
		assert.Equal(t, want, ep.String(), endpoint)
	}
	for _, endpoint := range []string{"", "http://localhost:1338", "http://imds.internal"} {
		_, ok := IMDS{Endpoint: endpoint}.EndpointAddr()
		assert.False(t, ok, "%q has no address to filter", endpoint)
	}
}

func TestTheSDKsEnvironmentFillsWhatTheFileLeavesEmpty(t *testing.T) {
	env := func(vars map[string]string) func(string) string { return func(k string) string { return vars[k] } }
	c := Default()
	require.NoError(t, c.FromEnvironment(env(map[string]string{EndpointEnv: "http://[::1]:1338", EndpointModeEnv: "IPv6"})))
	assert.Equal(t, "http://[::1]:1338", c.IMDS.Endpoint)
	assert.Equal(t, EndpointModeIPv6, c.IMDS.EndpointMode)
	assert.Equal(t, EndpointEnv, c.Source("imds.endpoint"))

	c, err := Parse([]byte("imds:\n  endpoint: http://127.0.0.1:9\n  endpoint_mode: ipv4\n"), "f")
	require.NoError(t, err)
	require.NoError(t, c.FromEnvironment(env(map[string]string{EndpointEnv: "http://[::1]:1338", EndpointModeEnv: "IPv6"})))
	assert.Equal(t, "http://127.0.0.1:9", c.IMDS.Endpoint, "the file wins")
	assert.Equal(t, EndpointModeIPv4, c.IMDS.EndpointMode)

	c = Default()
	c.IMDS.AllowUsers = []string{"root"}
	err = c.FromEnvironment(env(map[string]string{EndpointEnv: "http://imds.internal"}))
	require.ErrorIs(t, err, ErrInvalid)
	assert.Contains(t, err.Error(), EndpointEnv+": imds.endpoint: \"http://imds.internal\" names its host by name")
	c = Default()
	err = c.FromEnvironment(env(map[string]string{EndpointModeEnv: "IPv5"}))
	assert.EqualError(t, err, EndpointModeEnv+`: "IPv5" is not ipv4 or ipv6`)
}

func TestARemoteMetricsListenerIsAllowedWhenAskedFor(t *testing.T) {
	for _, listen := range []string{"127.0.0.1:9469", "[::1]:9469", "localhost:9469"} {
		_, err := Parse([]byte("metrics:\n  listen: \""+listen+"\"\n"), "f")
		assert.NoError(t, err, listen)
	}
	_, err := Parse([]byte("metrics:\n  listen: 0.0.0.0:9469\n  allow_remote: true\n"), "f")
	assert.NoError(t, err)
}

func TestParseEmptyFileGivesTheDefaults(t *testing.T) {
	cfg, err := Parse([]byte("# nothing yet\n"), "config f")
	require.NoError(t, err)
	assert.Equal(t, Default().IMDS, cfg.IMDS)
}

func TestLoadRefusesAHugeFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(path, make([]byte, maxFileSize+1), 0o600))
	_, err := Load(path, false)
	require.ErrorIs(t, err, ErrInvalid)
	assert.Contains(t, err.Error(), "is this the config file?")
}

func TestInvalidErrorIsMatchedThroughWrapping(t *testing.T) {
	err := errors.Join(errors.New("other"), &InvalidError{Source: "s", Reason: "r"})
	assert.ErrorIs(t, err, ErrInvalid)
	assert.NotErrorIs(t, errors.New("plain"), ErrInvalid)
}

// The packaged config file documents every key at its default; it must
// stay true to the code.
func TestThePackagedConfigShowsTheDefaults(t *testing.T) {
	cfg, err := Load("../packaging/config.yaml", false)
	require.NoError(t, err)
	for _, key := range yamlKeys(reflect.TypeFor[Config]()) {
		assert.NotContains(t, cfg.Source(key), "default", "packaging/config.yaml does not document %s", key)
	}
	want := Default()
	want.Chef.RunList = []string{}
	want.Chef.InitialAttributes = Object{}
	cfg.sources = nil
	assert.Equal(t, want, cfg)
}

// yamlKeys lists the "section.key" paths of the config file's schema.
func yamlKeys(t reflect.Type) []string {
	var keys []string
	for section := range t.Fields() {
		name := section.Tag.Get("yaml")
		if name == "" || name == "-" {
			continue
		}
		for field := range section.Type.Fields() {
			if k := field.Tag.Get("yaml"); k != "" && k != "-" {
				keys = append(keys, name+"."+k)
			}
		}
	}
	return keys
}

func TestThePackerExampleConfigLoads(t *testing.T) {
	cfg, err := Load("../packaging/packer/config.yaml", false)
	require.NoError(t, err)
	assert.Equal(t, "{hostname}-{instance_id}", cfg.Chef.NodeName)
}

// The README's configuration reference, from which bootagent.yaml(5) is
// made (scripts/man.sh), names every key of the file, and no other.
func TestTheReferenceNamesEveryKey(t *testing.T) {
	data, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	section := string(data)
	start := strings.Index(section, "\n## Configuration reference\n")
	require.NotEqual(t, -1, start)
	section = section[start+1:]
	if end := strings.Index(section, "\n## "); end != -1 {
		section = section[:end]
	}
	var documented []string
	key := regexp.MustCompile("`([a-z0-9_]+\\.[a-z0-9_]+)`")
	for _, row := range regexp.MustCompile("(?m)^\\| (`[^|]*`) \\|").FindAllStringSubmatch(section, -1) {
		for _, m := range key.FindAllStringSubmatch(row[1], -1) {
			documented = append(documented, m[1])
		}
	}
	assert.ElementsMatch(t, yamlKeys(reflect.TypeFor[Config]()), documented)
}
