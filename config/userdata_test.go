package config

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/hostname"
	"github.com/bootagent/bootagent/internal/testenv"
)

const mimeUserData = `Content-Type: multipart/mixed; boundary="==BOUNDARY=="
MIME-Version: 1.0

--==BOUNDARY==
Content-Type: text/x-shellscript; charset="us-ascii"

#!/bin/bash
echo hello
--==BOUNDARY==
Content-Type: text/cloud-config; charset="us-ascii"

#cloud-config
hostname: web01
chef:
  run_list: ["role[web]"]
--==BOUNDARY==
Content-Type: text/x-bootagent

domain=example.internal
chef_environment=production
--==BOUNDARY==--
`

func TestApplyUserDataForms(t *testing.T) {
	b64Part := base64.StdEncoding.EncodeToString([]byte("hostname=db01\ndomain=example.internal\n"))
	tests := []struct {
		name       string
		data       []byte
		wantName   string
		wantDomain string
		wantFormat string
		check      func(t *testing.T, c Config)
	}{
		{
			name:       "key=value with comments, quotes and a run list",
			data:       []byte("# set by the launch template\nhostname=web01\ndomain = \"example.internal\"\nchef_run_list=role[web], recipe[base]\nchef_environment='production'\n"),
			wantName:   "web01",
			wantDomain: "example.internal",
			wantFormat: "key=value",
			check: func(t *testing.T, c Config) {
				assert.Equal(t, []string{"role[web]", "recipe[base]"}, c.Chef.RunList)
				assert.Equal(t, "production", c.Chef.Environment)
			},
		},
		{
			name:       "key=value limiting IMDS to two users",
			data:       []byte("hostname=web01\nimds_allow_users=root, _chrony\n"),
			wantName:   "web01",
			wantFormat: "key=value",
			check: func(t *testing.T, c Config) {
				assert.Equal(t, []string{"root", "_chrony"}, c.IMDS.AllowUsers)
				assert.Equal(t, "user-data (key=value) line 2 key imds_allow_users", c.Source("imds.allow_users"))
			},
		},
		{
			name:       "cloud-config limiting IMDS in the bootagent block",
			data:       []byte("#cloud-config\nhostname: web01\nbootagent:\n  imds:\n    allow_users: [root]\n"),
			wantName:   "web01",
			wantFormat: "#cloud-config",
			check: func(t *testing.T, c Config) {
				assert.Equal(t, []string{"root"}, c.IMDS.AllowUsers)
			},
		},
		{
			name:       "key=value with an fqdn and CRLF line ends",
			data:       []byte("fqdn=Web01.Example.Internal\r\nprefer_fqdn=no\r\n"),
			wantName:   "Web01.Example.Internal",
			wantFormat: "key=value",
			check: func(t *testing.T, c Config) {
				assert.False(t, c.Hostname.PreferFQDN)
			},
		},
		{
			name:       "JSON with native types",
			data:       []byte(`{"hostname": "web01", "domain": "example.internal", "chef_run_list": ["role[web]"], "manage_etc_hosts": false, "chef_initial_attributes": {"app": {"port": 8080}}}`),
			wantName:   "web01",
			wantDomain: "example.internal",
			wantFormat: "JSON",
			check: func(t *testing.T, c Config) {
				assert.Equal(t, []string{"role[web]"}, c.Chef.RunList)
				assert.False(t, c.Hostname.ManageEtcHosts)
				assert.Equal(t, "8080", fmt.Sprint(c.Chef.InitialAttributes["app"].(map[string]any)["port"]))
			},
		},
		{
			name:       "cloud-config with fqdn and cloud-init's chef block",
			data:       []byte("#cloud-config\nfqdn: web01.example.internal\nprefer_fqdn_over_hostname: false\nmanage_etc_hosts: localhost\npackages: [nginx]\nchef:\n  server_url: https://chef.example.com/organizations/acme\n  validation_name: acme-validator\n  node_name: web01\n  environment: staging\n  run_list:\n    - recipe[apache2]\n    - role[db]\n  initial_attributes:\n    apache: {prefork: {maxclients: 100}}\n  ssl_verify_mode: :verify_peer\n  install_type: omnibus\n"),
			wantName:   "web01.example.internal",
			wantFormat: "#cloud-config",
			check: func(t *testing.T, c Config) {
				assert.False(t, c.Hostname.PreferFQDN)
				assert.True(t, c.Hostname.ManageEtcHosts)
				assert.Equal(t, "https://chef.example.com/organizations/acme", c.Chef.ServerURL)
				assert.Equal(t, "acme-validator", c.Chef.ValidationClientName)
				assert.Equal(t, "web01", c.Chef.NodeName)
				assert.Equal(t, "staging", c.Chef.Environment)
				assert.Equal(t, []string{"recipe[apache2]", "role[db]"}, c.Chef.RunList)
				assert.True(t, c.Chef.SSLVerify)
				assert.Contains(t, c.Chef.InitialAttributes, "apache")
			},
		},
		{
			name:       "cloud-config with a dotted hostname takes it as the FQDN",
			data:       []byte("#cloud-config\nhostname: web01.example.internal\npreserve_hostname: false\n"),
			wantName:   "web01.example.internal",
			wantFormat: "#cloud-config",
		},
		{
			name:       "cloud-config bootagent block overrides cloud-init's keys",
			data:       []byte("#cloud-config\nhostname: ignored\nbootagent:\n  hostname:\n    name: web02\n    domain: example.internal\n    from_tag: Name\n  chef:\n    interval: 10m\n"),
			wantName:   "web02",
			wantDomain: "example.internal",
			wantFormat: "#cloud-config",
			check: func(t *testing.T, c Config) {
				assert.Equal(t, "Name", c.Hostname.FromTag)
				assert.Equal(t, "10m0s", c.Chef.Interval.String())
				assert.Contains(t, c.Source("chef.interval"), "bootagent block line 9")
			},
		},
		{
			name:       "cloud-config validation_cert is kept but system is not",
			data:       []byte("#cloud-config\nhostname: web01\nchef:\n  validation_cert: |\n    -----BEGIN RSA PRIVATE KEY-----\n    abc\n    -----END RSA PRIVATE KEY-----\n"),
			wantName:   "web01",
			wantFormat: "#cloud-config",
			check: func(t *testing.T, c Config) {
				assert.Contains(t, c.Chef.ValidationCert, "BEGIN RSA PRIVATE KEY")
			},
		},
		{
			name:       "gzip-compressed key=value",
			data:       testenv.Gzip(t, "hostname=web03\n"),
			wantName:   "web03",
			wantFormat: "gzip > key=value",
		},
		{
			name:       "MIME multipart with a script, cloud-config and x-bootagent",
			data:       []byte(mimeUserData),
			wantName:   "web01",
			wantDomain: "example.internal",
			wantFormat: "MIME multipart (text/x-shellscript (ignored), text/cloud-config, text/x-bootagent (key=value))",
			check: func(t *testing.T, c Config) {
				assert.Equal(t, []string{"role[web]"}, c.Chef.RunList)
				assert.Equal(t, "production", c.Chef.Environment)
			},
		},
		{
			name:       "gzip-compressed MIME with a base64 part",
			data:       testenv.Gzip(t, "Content-Type: multipart/mixed; boundary=XX\n\n--XX\nContent-Type: text/x-bootagent\nContent-Transfer-Encoding: base64\n\n"+b64Part+"\n--XX--\n"),
			wantName:   "db01",
			wantDomain: "example.internal",
			wantFormat: "gzip > MIME multipart (text/x-bootagent (key=value))",
		},
		{
			name:       "a shell script is left to cloud-init",
			data:       []byte("#!/bin/bash\nhostnamectl set-hostname x\n"),
			wantFormat: "ignored",
		},
		{
			name:       "binary is ignored",
			data:       []byte{0x00, 0xff, 0xfe, 0x10, 'x'},
			wantFormat: "ignored",
		},
		{
			name:       "empty user-data changes nothing",
			data:       []byte("  \n"),
			wantFormat: "none",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, info, err := ApplyUserData(Default(), tt.data)
			require.NoError(t, err)
			assert.Equal(t, tt.wantName, cfg.Hostname.Name, "hostname.name")
			assert.Equal(t, tt.wantDomain, cfg.Hostname.Domain, "hostname.domain")
			assert.Equal(t, tt.wantFormat, info.Format, "format")
			if tt.check != nil {
				tt.check(t, cfg)
			}
		})
	}
}

func TestApplyUserDataNamesWhereEachSettingCameFrom(t *testing.T) {
	cfg, info, err := ApplyUserData(Default(), []byte(mimeUserData))
	require.NoError(t, err)
	assert.Equal(t, "user-data part 2 #cloud-config line 2 key hostname", cfg.Source("hostname.name"))
	assert.Equal(t, "user-data part 3 (key=value) line 1 key domain", cfg.Source("hostname.domain"))
	assert.Equal(t, []string{"hostname.name", "chef.run_list", "hostname.domain", "chef.environment"}, info.Keys)
	assert.Len(t, info.Ignored, 1, "the shell script part: %v", info.Ignored)
}

func TestApplyUserDataLeavesTheBaseUntouched(t *testing.T) {
	base := Default()
	base.Chef.RunList = []string{"role[base]"}
	_, _, err := ApplyUserData(base, []byte("#cloud-config\nbootagent:\n  chef:\n    run_list: ['role[web]']\n"))
	require.NoError(t, err)
	assert.Equal(t, []string{"role[base]"}, base.Chef.RunList)
}

func TestApplyUserDataKeepsTheFileDomainForAShortName(t *testing.T) {
	base := Default()
	base.Hostname.Domain = "corp.internal"
	cfg, _, err := ApplyUserData(base, []byte("hostname=web01\n"))
	require.NoError(t, err)
	assert.Equal(t, "corp.internal", cfg.Hostname.Domain)

	cfg, _, err = ApplyUserData(base, []byte("fqdn=web01.other.internal\n"))
	require.NoError(t, err)
	assert.Empty(t, cfg.Hostname.Domain, "an fqdn is complete; the baked domain must not be appended")
}

func TestApplyUserDataRefusesBadInput(t *testing.T) {
	truncated := testenv.Gzip(t, strings.Repeat("hostname=web01\n", 100))
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"a truncated gzip", truncated[:len(truncated)/2], "user-data: gzip: unexpected EOF (truncated or corrupt)"},
		{"a gzip bomb", testenv.Gzip(t, "hostname=x\n#"+strings.Repeat("a", MaxUserDataSize)), "decompresses to more than"},
		{"16 MiB of user-data", bytes.Repeat([]byte("a"), 16<<20), "16777216 bytes is more than the 1048576 bootagent reads"},
		{"MIME multipart without a boundary", []byte("Content-Type: multipart/mixed\n\n--x\n\nhostname=a\n--x--\n"), "multipart/mixed without a boundary parameter"},
		{"MIME whose boundary never appears", []byte("Content-Type: multipart/mixed; boundary=zz\n\nhostname=a\n"), `no part found with boundary "zz"`},
		{"a MIME part with bad base64", []byte("Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/x-bootagent\nContent-Transfer-Encoding: base64\n\n!!!\n--b--\n"), "user-data part 1: base64 body"},
		{"key=value with invalid UTF-8", []byte("hostname=web\xff01\n"), "user-data (key=value): not valid UTF-8"},
		{"key=value with a user that is not a name", []byte("imds_allow_users=root;rm\n"), `user-data (key=value) line 1 key imds_allow_users: imds.allow_users: "root;rm" is not a user name or a uid`},
		{"key=value with an unknown key", []byte("hostnme=web01\n"), `user-data (key=value) line 1 key hostnme: unknown key "hostnme"`},
		{"key=value with a line that is not key=value", []byte("hostname=web01\nthis is not\n"), `line 2: "this is not" is not key=value`},
		{"key=value with a key given twice", []byte("hostname=a\nhostname=b\n"), "user-data (key=value) line 2 key hostname: given twice (first on line 1); keep one"},
		{"key=value with a bad boolean", []byte("prefer_fqdn=maybe\n"), `key prefer_fqdn: "maybe" is not true or false`},
		{"key=value with attributes that are not JSON", []byte("chef_initial_attributes={a:1}\n"), "key chef_initial_attributes: not a JSON object"},
		{"JSON with a syntax error names the line", []byte("{\n\"hostname\": \"a\",\n}"), "user-data (JSON): line 3: invalid character '}'"},
		{"JSON with a wrong type", []byte(`{"hostname": 12}`), "user-data (JSON) key hostname: want a string, got 12"},
		{"JSON with two objects", []byte(`{"hostname": "a"} {}`), "text after the JSON object"},
		{"cloud-config that is not YAML", []byte("#cloud-config\nhostname: [a\n"), "user-data #cloud-config: line 1: did not find expected ',' or ']'"},
		{"cloud-config with invalid UTF-8", []byte("#cloud-config\nhostname: \xc3\x28\n"), "user-data #cloud-config: not valid UTF-8"},
		{"cloud-config with a list for a hostname", []byte("#cloud-config\nhostname: [a, b]\n"), "line 2 key hostname: line 2: want a string"},
		{"cloud-config whose top is not a mapping", []byte("#cloud-config\n- a\n"), "want a mapping of keys"},
		{"cloud-config with a bad ssl_verify_mode", []byte("#cloud-config\nchef:\n  ssl_verify_mode: :sometimes\n"), `key chef.ssl_verify_mode: ":sometimes" is not :verify_peer or :verify_none`},
		{"cloud-config with a bad manage_etc_hosts", []byte("#cloud-config\nmanage_etc_hosts: partly\n"), "want true, false, template or localhost"},
		{"an unknown key in the bootagent block", []byte("#cloud-config\nbootagent:\n  hostname:\n    nam: x\n"), `user-data #cloud-config bootagent block: unknown key "nam" in hostname`},
		{"a YAML alias bomb in a run list", []byte("#cloud-config\n" + yamlBomb + "chef:\n  run_list: *h\n"), "want a list of strings: line 8: cannot unmarshal !!seq into string"},
		{"a YAML alias bomb in attributes", []byte("#cloud-config\n" + yamlBomb + "chef:\n  initial_attributes: {x: *h}\n"), "excessive aliasing"},
		{"a YAML alias bomb in the bootagent block", []byte("#cloud-config\n" + yamlBomb + "bootagent:\n  chef:\n    run_list: *h\n"), "excessive aliasing"},
		{"fqdn and hostname that disagree", []byte("fqdn=web01.example.com\nhostname=db01\n"), `hostname "db01" disagrees with fqdn "web01.example.com"`},
		{"fqdn and domain that disagree", []byte("fqdn=web01.example.com\ndomain=other.com\n"), `domain "other.com" disagrees with fqdn`},
		{"a dotted hostname with a domain", []byte("hostname=web01.a\ndomain=example.com\n"), "already has a domain"},
		{"settings that fail validation name their user-data key", []byte("chef_server_url=ftp://x\n"), `user-data (key=value) line 1 key chef_server_url: chef.server_url: "ftp://x" must start with http:// or https://`},
		{"MIME nested too deep", nestedMIME(6), "nest deeper than 4 levels"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assertRefused(t, tt.data, tt.want) })
	}
}

// assertRefused checks that data is refused as invalid user-data, with an
// error that says want.
func assertRefused(t *testing.T, data []byte, want string) {
	t.Helper()
	_, _, err := ApplyUserData(Default(), data)
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrInvalid)
	assert.Contains(t, err.Error(), want)
}

const yamlBomb = `a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
`

func nestedMIME(depth int) []byte {
	body := "hostname=deep\n"
	for i := range depth {
		b := fmt.Sprintf("b%d", i)
		body = fmt.Sprintf("Content-Type: multipart/mixed; boundary=%s\n\n--%s\n%s\n--%s--\n", b, b, body, b)
	}
	return []byte(body)
}

func BenchmarkApplyUserData(b *testing.B) {
	inputs := []struct {
		name string
		data []byte
	}{
		{"key=value", []byte("hostname=web01\ndomain=example.internal\nchef_run_list=role[web],recipe[base]\nchef_environment=production\n")},
		{"json", []byte(`{"hostname":"web01","domain":"example.internal","chef_run_list":["role[web]","recipe[base]"]}`)},
		{"cloud-config", []byte("#cloud-config\nfqdn: web01.example.internal\nchef:\n  run_list: [\"role[web]\"]\n  environment: production\npackages: [nginx, curl]\n")},
		{"mime", []byte(mimeUserData)},
		{"gzip-mime", testenv.Gzip(b, mimeUserData)},
	}
	for _, in := range inputs {
		b.Run(in.name, func(b *testing.B) {
			base := Default()
			b.ReportAllocs()
			b.SetBytes(int64(len(in.data)))
			for b.Loop() {
				if _, _, err := ApplyUserData(base, in.data); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func TestApplyUserDataFollowsAnchorsIntoTheBootagentBlock(t *testing.T) {
	cfg, _, err := ApplyUserData(Default(), []byte("#cloud-config\nx-common: &common ['role[base]']\nbootagent:\n  chef:\n    run_list: *common\n"))
	require.NoError(t, err)
	assert.Equal(t, []string{"role[base]"}, cfg.Chef.RunList)
}

// bom is the UTF-8 byte-order mark some Windows editors put first.
const bom = "\xef\xbb\xbf"

func TestApplyUserDataStripsAByteOrderMark(t *testing.T) {
	b64 := base64.StdEncoding.EncodeToString([]byte(bom + "hostname=web01\n"))
	part := func(ctype, body string) []byte {
		return []byte("Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: " + ctype + "\n\n" + body + "\n--b--\n")
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"key=value", []byte(bom + "hostname=web01\n")},
		{"JSON", []byte(bom + `{"hostname": "web01"}`)},
		{"#cloud-config", []byte(bom + "#cloud-config\nhostname: web01\n")},
		{"MIME headers", []byte(bom + "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/x-bootagent\n\nhostname=web01\n--b--\n")},
		{"a text/x-bootagent part", part("text/x-bootagent", bom+"hostname=web01")},
		{"a JSON text/x-bootagent part", part("text/x-bootagent", bom+`{"hostname": "web01"}`)},
		{"a text/cloud-config part", part("text/cloud-config", bom+"#cloud-config\nhostname: web01")},
		{"a text/plain part", part("text/plain", bom+"#cloud-config\nhostname: web01")},
		{"a base64 part", []byte("Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/x-bootagent\nContent-Transfer-Encoding: base64\n\n" + b64 + "\n--b--\n")},
		{"gzip", testenv.Gzip(t, bom+"#cloud-config\nhostname: web01\n")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, info, err := ApplyUserData(Default(), tt.data)
			require.NoError(t, err)
			assert.Equal(t, "web01", cfg.Hostname.Name, "hostname.name (format %q, ignored %v)", info.Format, info.Ignored)
		})
	}
}

func TestApplyUserDataRefusesAKeyGivenTwice(t *testing.T) {
	tests := []struct {
		name string
		data string
		want string
	}{
		{"at the top of JSON", "{\"hostname\": \"a\",\n \"hostname\": \"b\"}", "user-data (JSON) line 2 key hostname: given twice (first on line 1); keep one"},
		{"in JSON attributes", "{\"chef_initial_attributes\": {\"app\": {\"port\": 1,\n \"port\": 2}}}", "user-data (JSON) line 2 key chef_initial_attributes.app.port: given twice (first on line 1)"},
		{"in JSON attributes inside a list", `{"chef_initial_attributes": {"l": [{"a": 1, "a": 2}]}}`, "key chef_initial_attributes.l[0].a: given twice"},
		{"in key=value attributes", "hostname=a\nchef_initial_attributes={\"a\": 1, \"a\": 2}\n", "user-data (key=value) line 2 key chef_initial_attributes.a: given twice (first on line 2)"},
		{"at the top of cloud-config", "#cloud-config\nhostname: a\npackages: [x]\nhostname: b\n", "user-data #cloud-config line 4 key hostname: given twice (first on line 2); keep one"},
		{"in the chef block", "#cloud-config\nchef:\n  run_list: [a]\n  run_list: [b]\n", "user-data #cloud-config line 4 key chef.run_list: given twice (first on line 3)"},
		{"in cloud-config attributes", "#cloud-config\nchef:\n  initial_attributes:\n    app:\n      port: 1\n      port: 2\n", "user-data #cloud-config line 6 key chef.initial_attributes.app.port: given twice (first on line 5)"},
		{"in the bootagent block", "#cloud-config\nbootagent:\n  chef:\n    interval: 10m\n    interval: 20m\n", "user-data #cloud-config bootagent block line 5 key chef.interval: given twice (first on line 4)"},
		{"as a section of the bootagent block", "#cloud-config\nbootagent:\n  chef: {interval: 10m}\n  chef: {splay: 1m}\n", "bootagent block line 4 key chef: given twice (first on line 3)"},
		{"in a MIME part", "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/x-bootagent\n\n{\"domain\": \"a\", \"domain\": \"b\"}\n--b--\n", "user-data part 1 (JSON) line 1 key domain: given twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assertRefused(t, []byte(tt.data), tt.want) })
	}
}

func TestApplyUserDataHonoursYAMLMergeKeys(t *testing.T) {
	t.Run("at the top, an explicit key winning", func(t *testing.T) {
		cfg, info, err := ApplyUserData(Default(), []byte("#cloud-config\nx-base: &base {hostname: web01, prefer_fqdn_over_hostname: false}\n<<: *base\nhostname: web02\n"))
		require.NoError(t, err)
		assert.Equal(t, "web02", cfg.Hostname.Name, "the explicit key wins over the merged one")
		assert.False(t, cfg.Hostname.PreferFQDN, "the merged key applies")
		assert.NotContains(t, strings.Join(info.Ignored, " "), "<<")
	})
	t.Run("in the chef block, earlier maps winning in a list", func(t *testing.T) {
		cfg, _, err := ApplyUserData(Default(), []byte("#cloud-config\nx-a: &a {environment: prod, run_list: ['role[a]']}\nx-b: &b {environment: staging, node_name: n1}\nchef:\n  <<: [*a, *b]\n  node_name: n2\n"))
		require.NoError(t, err)
		assert.Equal(t, "prod", cfg.Chef.Environment, "the earlier merged map wins")
		assert.Equal(t, []string{"role[a]"}, cfg.Chef.RunList)
		assert.Equal(t, "n2", cfg.Chef.NodeName, "the explicit key wins")
	})
	t.Run("in attributes, nested", func(t *testing.T) {
		cfg, _, err := ApplyUserData(Default(), []byte("#cloud-config\nx-app: &app {port: 80, workers: 2}\nchef:\n  initial_attributes:\n    app:\n      <<: *app\n      port: 8080\n"))
		require.NoError(t, err)
		assert.Equal(t, map[string]any{"port": 8080, "workers": 2}, cfg.Chef.InitialAttributes["app"])
	})
	t.Run("in the bootagent block, naming where each key came from", func(t *testing.T) {
		cfg, info, err := ApplyUserData(Default(), []byte("#cloud-config\nx-chef: &chef {interval: 10m, splay: 1m}\nbootagent:\n  chef:\n    <<: *chef\n    splay: 2m\n"))
		require.NoError(t, err)
		assert.Equal(t, "10m0s", cfg.Chef.Interval.String())
		assert.Equal(t, "2m0s", cfg.Chef.Splay.String())
		assert.Equal(t, []string{"chef.interval", "chef.splay"}, info.Keys)
		assert.Equal(t, "user-data #cloud-config bootagent block line 2", cfg.Source("chef.interval"))
	})
	t.Run("a merge key takes only mappings", func(t *testing.T) {
		_, _, err := ApplyUserData(Default(), []byte("#cloud-config\nchef:\n  <<: [a, b]\n"))
		require.ErrorIs(t, err, ErrInvalid)
		assert.Contains(t, err.Error(), "user-data #cloud-config line 3 key chef.<<: a merge key takes a mapping or a list of mappings")
	})
	t.Run("merges are bounded", func(t *testing.T) {
		bomb := "#cloud-config\nx0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}\n"
		for i := 1; i < 9; i++ {
			bomb += fmt.Sprintf("x%d: &m%d {<<: [*m%d, *m%d, *m%d, *m%d, *m%d, *m%d, *m%d, *m%d, *m%d]}\n", i, i, i-1, i-1, i-1, i-1, i-1, i-1, i-1, i-1, i-1)
		}
		_, _, err := ApplyUserData(Default(), []byte(bomb+"chef:\n  <<: *m8\n"))
		require.ErrorIs(t, err, ErrInvalid)
		assert.Contains(t, err.Error(), "excessive aliasing")
	})
}

func TestApplyUserDataRefusesNumbersThatAreNotFinite(t *testing.T) {
	tests := []struct {
		name string
		data string
		want string
	}{
		{"JSON 1e999", `{"chef_initial_attributes": {"app": {"big": 1e999}}}`, "user-data (JSON) key chef_initial_attributes: chef_initial_attributes.app.big is 1e999, not a finite number"},
		{"JSON -1e999 in a list", `{"chef_initial_attributes": {"l": [1, -1e999]}}`, "chef_initial_attributes.l[1] is -1e999, not a finite number"},
		{"key=value 1e999", "chef_initial_attributes={\"big\": 1E400}\n", "user-data (key=value) line 1 key chef_initial_attributes: chef_initial_attributes.big is 1E400, not a finite number"},
		{"YAML .inf", "#cloud-config\nchef:\n  initial_attributes:\n    big: .inf\n", "user-data #cloud-config line 4 key chef.initial_attributes.big: .inf is not a finite number"},
		{"YAML -.Inf", "#cloud-config\nchef:\n  initial_attributes: {big: -.Inf}\n", "key chef.initial_attributes.big: -.Inf is not a finite number"},
		{"YAML .nan", "#cloud-config\nchef:\n  initial_attributes:\n    app: {x: .NaN}\n", "line 4 key chef.initial_attributes.app.x: .NaN is not a finite number"},
		{"YAML 1e999", "#cloud-config\nchef:\n  initial_attributes:\n    big: 1e999\n", "line 4 key chef.initial_attributes.big: 1e999 is not a finite number"},
		{"YAML 1.0e+999", "#cloud-config\nchef:\n  initial_attributes:\n    big: 1.0e+999\n", "line 4 key chef.initial_attributes.big: 1.0e+999 is not a finite number"},
		{"YAML in the bootagent block", "#cloud-config\nbootagent:\n  chef:\n    initial_attributes:\n      big: 1e999\n", "user-data #cloud-config bootagent block line 5 key chef.initial_attributes.big: 1e999 is not a finite number"},
		{"YAML tagged !!float 1e999", "#cloud-config\nchef:\n  initial_attributes:\n    app:\n      big: !!float 1e999\n", "user-data #cloud-config line 5 key chef.initial_attributes.app.big: 1e999 is not a finite number"},
		{"YAML tagged !!float -1e999 in a list", "#cloud-config\nchef:\n  initial_attributes:\n    l: [1, !!float -1e999]\n", "line 4 key chef.initial_attributes.l[1]: -1e999 is not a finite number"},
		{"YAML tagged !!float that is not a number", "#cloud-config\nchef:\n  initial_attributes:\n    big: !!float lots\n", `line 4 key chef.initial_attributes.big: "lots" is tagged !!float but is not a number`},
		{"YAML tagged !!float in the bootagent block", "#cloud-config\nbootagent:\n  chef:\n    initial_attributes:\n      big: !!float 1e999\n", "user-data #cloud-config bootagent block line 5 key chef.initial_attributes.big: 1e999 is not a finite number"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assertRefused(t, []byte(tt.data), tt.want) })
	}
	t.Run("quoted, it is text", func(t *testing.T) {
		cfg, _, err := ApplyUserData(Default(), []byte("#cloud-config\nchef:\n  initial_attributes:\n    big: '1e999'\n    small: 1e-999\n"))
		require.NoError(t, err)
		assert.Equal(t, "1e999", cfg.Chef.InitialAttributes["big"])
	})
}

func TestApplyUserDataLeavesCloudInitsOwnKeysGivenTwiceToIt(t *testing.T) {
	data := "#cloud-config\nhostname: web01\nruncmd: [a]\nruncmd: [b]\nchef:\n  omnibus_url: x\n  omnibus_url: y\nbase: &base {packages: [p]}\nother:\n  <<: *base\n  <<: {q: 1}\n"
	cfg, info, err := ApplyUserData(Default(), []byte(data))
	require.NoError(t, err, "cloud-init takes the last of its own keys, and so may bootagent")
	assert.Equal(t, "web01", cfg.Hostname.Name)
	assert.Contains(t, info.Ignored, "user-data #cloud-config: keys left to cloud-init: runcmd, base, other")
	assert.Contains(t, info.Ignored, "user-data #cloud-config: chef keys for cloud-init only: omnibus_url")
}

// emptyMergeBomb is 854 bytes of YAML that merge an empty mapping 20^7 times:
// each level merges twenty aliases of the one below.
func emptyMergeBomb() string {
	var b strings.Builder
	b.WriteString("#cloud-config\nx0: &a0 {}\n")
	for i := 1; i <= 7; i++ {
		fmt.Fprintf(&b, "x%d: &a%d {<<: [%s]}\n", i, i, strings.TrimSuffix(strings.Repeat(fmt.Sprintf("*a%d, ", i-1), 20), ", "))
	}
	return b.String()
}

func TestApplyUserDataBoundsMergesOfEmptyMappings(t *testing.T) {
	tests := []struct {
		name, where string
	}{
		{"at the top", "<<: *a7\nhostname: web01\n"},
		{"in the chef block", "hostname: web01\nchef:\n  <<: *a7\n  server_url: https://chef.example.com/organizations/acme\n"},
		{"in attributes", "chef:\n  initial_attributes:\n    <<: *a7\n"},
		{"in the bootagent block", "bootagent:\n  hostname:\n    <<: *a7\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assertRefused(t, []byte(emptyMergeBomb()+tt.where), "excessive aliasing") })
	}
}

func TestApplyUserDataRefusesASecondYAMLDocument(t *testing.T) {
	tests := []struct {
		name string
		data string
		want string
	}{
		{"with a second hostname", "#cloud-config\nhostname: web01\n---\nhostname: evil\n", "user-data #cloud-config: line 3: more than one YAML document (the second starts here)"},
		{"with an empty second document", "#cloud-config\nhostname: web01\n---\n", "user-data #cloud-config: line 3: more than one YAML document"},
		{"after an end marker", "#cloud-config\nhostname: web01\n...\n--- {hostname: evil}\n", "user-data #cloud-config: line 4: more than one YAML document"},
		{"with a second bootagent block", "#cloud-config\nbootagent:\n  hostname: {name: web01}\n---\nbootagent:\n  hostname: {name: evil}\n", "user-data #cloud-config: line 4: more than one YAML document"},
		{"in a MIME part", "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/cloud-config\n\n#cloud-config\nhostname: web01\n---\nhostname: evil\n--b--\n", "user-data part 1 #cloud-config: line 3: more than one YAML document"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { assertRefused(t, []byte(tt.data), tt.want) })
	}
	for name, data := range map[string]string{
		"one document that starts with ---": "#cloud-config\n---\nhostname: web01\n",
		"one document that ends with ...":   "#cloud-config\nhostname: web01\n...\n# a comment after the end\n",
	} {
		t.Run(name+" is read", func(t *testing.T) {
			cfg, _, err := ApplyUserData(Default(), []byte(data))
			require.NoError(t, err)
			assert.Equal(t, "web01", cfg.Hostname.Name)
		})
	}
}

func TestApplyUserDataDoesNotQuoteAPastedKey(t *testing.T) {
	const body = "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"
	tests := []struct {
		name  string
		data  string
		want  string
		quote string // what the error must not hold
	}{
		{"a PEM armour line", "hostname=web01\n-----BEGIN RSA PRIVATE KEY-----\n" + body + "\n-----END RSA PRIVATE KEY-----\n", "user-data (key=value) line 2: not key=value (it looks like part of a key, not quoted)", "PRIVATE KEY"},
		{"a line of base64", "hostname=web01\n# the key\n" + body + "\n", "user-data (key=value) line 3: not key=value (it looks like part of a key, not quoted)", body[:20]},
		{"a line with a long run of base64", "hostname=web01\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7vbqajDhA3 me@host\n", "user-data (key=value) line 2: not key=value (it looks like part of a key, not quoted)", "AAAAB3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assertRefused(t, []byte(tt.data), tt.want)
			_, _, err := ApplyUserData(Default(), []byte(tt.data))
			assert.NotContains(t, err.Error(), tt.quote)
		})
	}
	t.Run("a line that is not key material is quoted", func(t *testing.T) {
		assertRefused(t, []byte("hostname=web01\nthis is not\n"), `user-data (key=value) line 2: "this is not" is not key=value`)
	})
}

// A byte-order mark is dropped only where a document or part starts. One
// inside a value is kept as given, so that the host-name check, which
// takes letters, digits and hyphens alone, refuses it and names it.
func TestApplyUserDataLeavesAByteOrderMarkInsideANameForTheHostNameCheckToRefuse(t *testing.T) {
	tests := []struct {
		name string
		data string
	}{
		{"in #cloud-config", "#cloud-config\nhostname: " + bom + "web01\n"},
		{"in #cloud-config, quoted", "#cloud-config\nhostname: \"\\ufeffweb01\"\n"},
		{"in key=value", "domain=example.com\nhostname=" + bom + "web01\n"},
		{"in JSON", `{"hostname": "\ufeffweb01"}`},
		{"in the bootagent block", "#cloud-config\nbootagent:\n  hostname:\n    name: " + bom + "web01\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, _, err := ApplyUserData(Default(), []byte(tt.data))
			require.NoError(t, err, "host names are checked where they are made")
			require.Equal(t, bom+"web01", cfg.Hostname.Name, "the mark is kept, not dropped or half-dropped")
			_, err = hostname.Make(cfg.Hostname.Name, cfg.Hostname.Domain)
			require.ErrorIs(t, err, hostname.ErrInvalid)
			assert.Contains(t, err.Error(), `label 1 has '\ufeff'; only letters, digits and hyphens are allowed`)
		})
	}
	t.Run("in a domain", func(t *testing.T) {
		cfg, _, err := ApplyUserData(Default(), []byte("hostname=web01\ndomain=example"+bom+".com\n"))
		require.NoError(t, err)
		_, err = hostname.Make(cfg.Hostname.Name, cfg.Hostname.Domain)
		require.ErrorIs(t, err, hostname.ErrInvalid)
		assert.Contains(t, err.Error(), `domain invalid host name: "example\ufeff.com": label 1 has '\ufeff'`)
	})
}

func TestApplyUserDataTakesChefClientsOwnSettingsFromCloudInitsChefBlock(t *testing.T) {
	// The chef block of cloud-init's own example (doc/examples/cloud-config-chef.txt),
	// with the settings it writes to client.rb.
	data := `#cloud-config
chef:
  install_type: "packages"
  force_install: false
  omnibus_url: "https://www.chef.io/chef/install.sh"
  omnibus_version: "17"
  server_url: "https://chef.yourorg.com"
  node_name: "your-node-name"
  environment: "production"
  validation_name: "yourorg-validator"
  run_list:
    - "recipe[apache2]"
    - "role[db]"
  chef_license: "accept"
  encrypted_data_bag_secret: "/etc/chef/encrypted_data_bag_secret"
  log_level: ":info"
  file_cache_path: "/var/cache/chef"
  file_backup_path: "/var/backups/chef"
  pid_file: "/var/run/chef/client.pid"
  firstboot_path: "/etc/chef/firstboot.json"
  json_attribs: "/etc/chef/firstboot.json"
  show_time: false
`
	cfg, info, err := ApplyUserData(Default(), []byte(data))
	require.NoError(t, err)
	ch := cfg.Chef
	assert.Equal(t, "accept", ch.License)
	assert.Equal(t, "/etc/chef/encrypted_data_bag_secret", ch.EncryptedDataBagSecret)
	assert.Equal(t, "info", ch.LogLevel, "the symbol's colon is cloud-init's spelling")
	assert.Equal(t, "/var/run/chef/client.pid", ch.PIDFile)
	assert.Equal(t, "/var/cache/chef", ch.FileCachePath)
	assert.Equal(t, "/var/backups/chef", ch.FileBackupPath)
	assert.Equal(t, "/etc/chef/firstboot.json", ch.FirstBootPath)
	assert.Equal(t, "/etc/chef/firstboot.json", ch.JSONAttribs, "cloud-init's way: the first-boot file on every run")
	require.NotNil(t, ch.ShowTime)
	assert.False(t, *ch.ShowTime)
	assert.Nil(t, Default().Chef.ShowTime, "unset, chef-client's default holds")
	assert.Contains(t, info.Ignored, "user-data #cloud-config: chef keys for cloud-init only: install_type, force_install, omnibus_url, omnibus_version",
		"only the install keys are left to cloud-init")

	_, info, err = ApplyUserData(Default(), []byte("#cloud-config\nchef:\n  server_url: https://chef.example.com/\n  log_location: /var/log/chef/client.log\n  omnibus_url: https://example.com/install.sh\n"))
	require.NoError(t, err)
	assert.Equal(t, []string{
		"user-data #cloud-config: chef.log_location: bootagent writes log_location STDOUT, so that chef-client's output reaches the journal of its run's unit",
		"user-data #cloud-config: chef keys for cloud-init only: omnibus_url",
	}, info.Ignored, "log_location is a client.rb setting bootagent overrides, not cloud-init's")

	for _, bad := range []struct{ data, want string }{
		{"#cloud-config\nchef:\n  chef_license: yes-please\n", `chef.license: "yes-please" is not one of accept, accept-silent, accept-no-persist`},
		{"#cloud-config\nchef:\n  log_level: :loud\n", `chef.log_level: "loud" is not one of auto, trace, debug, info, warn, error, fatal`},
		{"#cloud-config\nchef:\n  encrypted_data_bag_secret: secret.txt\n", `chef.encrypted_data_bag_secret: "secret.txt" must be an absolute path`},
		{"#cloud-config\nchef:\n  firstboot_path: firstboot.json\n", `chef.firstboot_path: "firstboot.json" must be a .json file in /etc/chef or /etc/cinc`},
		{"#cloud-config\nchef:\n  firstboot_path: /etc/sudoers.d/chef.json\n", `chef.firstboot_path: "/etc/sudoers.d/chef.json" must be a .json file in /etc/chef or /etc/cinc`},
		{"#cloud-config\nchef:\n  firstboot_path: /etc/chef/../passwd.json\n", `must be a .json file in /etc/chef or /etc/cinc`},
		{"#cloud-config\nchef:\n  firstboot_path: /etc/chef/client.pem\n", `must be a .json file in /etc/chef or /etc/cinc`},
		{"#cloud-config\nchef:\n  firstboot_path: /etc/chef/key.json\n  client_key: /etc/chef/key.json\n", `chef.firstboot_path: "/etc/chef/key.json" is chef.client_key's file too`},
		{"#cloud-config\nchef:\n  json_attribs: attrs.json\n", `chef.json_attribs: "attrs.json" must be an absolute path`},
		{"#cloud-config\nchef:\n  show_time: sometimes\n", `chef.show_time`},
	} {
		assertRefused(t, []byte(bad.data), bad.want)
	}
}

func TestCloudInitsChefExampleMeansWhatTheEquivalentConfigSays(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	pemKey := string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
	indented := "    " + strings.ReplaceAll(strings.TrimSpace(pemKey), "\n", "\n    ")
	userData := `#cloud-config
chef:
  install_type: "packages"
  server_url: "https://chef.yourorg.com"
  node_name: "your-node-name"
  environment: "production"
  validation_name: "yourorg-validator"
  validation_cert: |
` + indented + `
  run_list:
    - "recipe[apache2]"
    - "role[db]"
  initial_attributes:
    apache:
      prefork:
        maxclients: 100
      keepalive: "off"
  chef_license: "accept"
  encrypted_data_bag_secret: "/etc/chef/encrypted_data_bag_secret"
  log_level: ":info"
  exec: true
`
	fromUserData, _, err := ApplyUserData(Default(), []byte(userData))
	require.NoError(t, err)
	fromFile, err := Parse([]byte(`chef:
  server_url: https://chef.yourorg.com
  node_name: your-node-name
  environment: production
  validation_client_name: yourorg-validator
  run_list: ["recipe[apache2]", "role[db]"]
  initial_attributes: {apache: {prefork: {maxclients: 100}, keepalive: "off"}}
  license: accept
  encrypted_data_bag_secret: /etc/chef/encrypted_data_bag_secret
  log_level: info
  exec: true
`), "config.yaml")
	require.NoError(t, err)
	assert.Equal(t, strings.TrimSpace(pemKey), strings.TrimSpace(fromUserData.Chef.ValidationCert), "the inline key, which only user-data carries")
	fromUserData.Chef.ValidationCert = ""
	assert.Equal(t, fromFile.Chef, fromUserData.Chef)
}

func TestAProxyURLWithCredentialsIsRefused(t *testing.T) {
	_, err := Parse([]byte("chef:\n  https_proxy: http://user:hunter2@proxy.corp:3128\n"), "config.yaml")
	require.ErrorIs(t, err, ErrInvalid)
	assert.Contains(t, err.Error(), "chef.https_proxy: a proxy URL must not carry a user or password")
	assert.NotContains(t, err.Error(), "hunter2")
}

func TestApplyUserDataNoticesAPrivateKeyInAnyPart(t *testing.T) {
	key := "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
	writeFiles := "#cloud-config\nhostname: web01\nwrite_files:\n  - path: /etc/chef/validation.pem\n    content: |\n      " + strings.ReplaceAll(key, "\n", "\n      ") + "\n"
	mime := "Content-Type: multipart/mixed; boundary=\"B\"\nMIME-Version: 1.0\n\n--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\ncat > /root/.ssh/id <<EOF\n" + key + "EOF\n--B\nContent-Type: text/x-bootagent\n\nhostname=web01\n--B--\n"
	for name, data := range map[string][]byte{
		"in a write_files entry, gzipped": testenv.Gzip(t, writeFiles),
		"in a shell script part of MIME":  []byte(mime),
	} {
		t.Run(name, func(t *testing.T) {
			_, info, err := ApplyUserData(Default(), data)
			require.NoError(t, err)
			assert.True(t, info.PrivateKey)
		})
	}
	_, info, err := ApplyUserData(Default(), []byte("hostname=web01\n"))
	require.NoError(t, err)
	assert.False(t, info.PrivateKey)
}
