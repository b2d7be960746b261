package agent

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/hostname"
	"github.com/bootagent/bootagent/internal/testenv"
)

func readInjections(t *testing.T) []string {
	f, err := os.Open("testdata/injections.txt")
	require.NoError(t, err)
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		v, err := strconv.Unquote(line)
		require.NoError(t, err, "%s", line)
		out = append(out, v)
	}
	require.NotEmpty(t, out)
	return out
}

// rubySettings reads client.rb with Ruby, as chef-client does.
func rubySettings(t *testing.T, rb []byte) map[string]string {
	path := filepath.Join(t.TempDir(), "client.rb")
	require.NoError(t, os.WriteFile(path, rb, 0o600))
	ruby := testenv.Tool(t, "ruby")
	out, err := exec.Command(ruby, "-c", path).CombinedOutput()
	require.NoError(t, err, "ruby -c refuses:\n%s\n%s", out, rb)
	const script = `o = Object.new; h = {}
o.define_singleton_method(:method_missing) { |n, *a| h[n.to_s] = a[0].to_s }
o.instance_eval(File.read(ARGV[0]), ARGV[0])
puts JSON.generate(h)`
	out, err = exec.Command(ruby, "-rjson", "-e", script, path).CombinedOutput()
	require.NoError(t, err, "%s", out)
	var settings map[string]string
	require.NoError(t, json.Unmarshal(out, &settings))
	return settings
}

// Every hostile value, in every field user-data sets, is refused with a
// clear error (exit 2), or lands in client.rb and first-boot.json escaped:
// Ruby reads back exactly the value, and the JSON decodes to it.
func TestHostileUserDataIsRefusedOrInert(t *testing.T) {
	base := config.Default()
	base.Chef.ServerURL = "https://chef.example.com/organizations/acme"
	fields := []struct {
		key   string
		value func(v string) any
		// readBack finds the value again in what was rendered, when
		// accepted.
		readBack func(t *testing.T, rb map[string]string, firstBoot map[string]any) string
	}{
		{"hostname", func(v string) any { return v }, nil},
		{"domain", func(v string) any { return v }, nil},
		{"chef_node_name", func(v string) any { return v }, func(_ *testing.T, rb map[string]string, _ map[string]any) string { return rb["node_name"] }},
		{"chef_environment", func(v string) any { return v }, func(_ *testing.T, rb map[string]string, _ map[string]any) string { return rb["environment"] }},
		{"chef_policy_name", func(v string) any { return v }, func(_ *testing.T, rb map[string]string, _ map[string]any) string { return rb["policy_name"] }},
		{"chef_run_list", func(v string) any { return []string{v} }, func(_ *testing.T, _ map[string]string, fb map[string]any) string {
			list, _ := fb["run_list"].([]any)
			if len(list) != 1 {
				return ""
			}
			return strings.TrimSuffix(strings.TrimPrefix(list[0].(string), "recipe["), "]")
		}},
		{"chef_server_url", func(v string) any { return "https://chef.example.com/" + v }, func(_ *testing.T, rb map[string]string, _ map[string]any) string {
			return strings.TrimPrefix(rb["chef_server_url"], "https://chef.example.com/")
		}},
		{"chef_initial_attributes", func(v string) any { return map[string]any{"app": v} }, func(_ *testing.T, _ map[string]string, fb map[string]any) string {
			s, _ := fb["app"].(string)
			return s
		}},
		{"chef_initial_attributes", func(v string) any { return map[string]any{v: 1} }, func(_ *testing.T, _ map[string]string, fb map[string]any) string {
			for k := range fb {
				if k != "run_list" {
					return k
				}
			}
			return ""
		}},
	}
	accepted, refused := 0, 0
	for _, v := range readInjections(t) {
		for _, f := range fields {
			doc := map[string]any{"hostname": "web01", f.key: f.value(v)}
			if f.key == "chef_policy_name" {
				doc["chef_policy_group"] = "prod"
			}
			data, err := json.Marshal(doc)
			require.NoError(t, err)
			_, err = CheckUserData(base, data)
			if err != nil {
				refused++
				assert.Equal(t, 2, ExitCode(err), "%s=%q: %v", f.key, v, err)
				assert.True(t, strings.HasPrefix(err.Error(), "user-data (JSON) key "), "the error names the user-data key: %v", err)
				continue
			}
			accepted++
			cfg, info, err := config.ApplyUserData(base, data)
			require.NoError(t, err)
			p, err := decide(cfg, info, checkGathered, "/")
			require.NoError(t, err)
			for _, n := range []string{p.name.Short, p.name.FQDN} {
				require.NoError(t, hostname.Validate(strings.TrimSuffix(n, ".")+"x"), "only valid host names pass: %q", n)
			}
			rb := rubySettings(t, p.chef.clientRB)
			var fb map[string]any
			require.NoError(t, json.Unmarshal(p.chef.firstBoot, &fb), "first-boot.json is JSON")
			if f.readBack != nil {
				// JSON user-data carries text, so invalid UTF-8 arrives
				// as U+FFFD; the agent must keep what it was given.
				want := strings.ToValidUTF8(v, "\uFFFD")
				assert.Equal(t, want, f.readBack(t, rb, fb), "%s=%q is read back unchanged", f.key, v)
			}
		}
	}
	t.Logf("%d hostile values refused, %d accepted and inert", refused, accepted)
	assert.Positive(t, refused)
	assert.Positive(t, accepted)
}
