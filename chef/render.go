// Package chef registers the instance with a Chef Infra Server (through
// go-chef/chef, which signs every request), renders chef-client's client.rb
// and first-boot.json, and runs chef-client.
package chef

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"
)

// ErrInvalid is matched by every refusal of a value that cannot be given to
// the Chef server or written into client.rb.
var ErrInvalid = errors.New("invalid Chef setting")

var (
	// Chef's own rules: client and node names, environments, policies,
	// run list items.
	clientNameRE  = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
	environmentRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	policyRE      = regexp.MustCompile(`^[A-Za-z0-9_.:-]+$`)
	runListItemRE = regexp.MustCompile(`^(recipe|role)\[([A-Za-z0-9_.:@-]+)\]$`)
	bareRecipeRE  = regexp.MustCompile(`^[A-Za-z0-9_.:@-]+$`)
	placeholderRE = regexp.MustCompile(`\{[^{}]*\}`)
)

// maxName bounds node, client, environment and policy names; Chef Server
// stores them in 255-character columns.
const maxName = 255

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// ValidateNodeName checks a node name, which is also the client name, by
// Chef's client name rule: letters, digits, _ . and -.
func ValidateNodeName(s string) error {
	if s == "" || len(s) > maxName || !clientNameRE.MatchString(s) {
		return invalid("node name %q: use 1 to %d letters, digits, '_', '.' or '-'", truncate(s), maxName)
	}
	return nil
}

// ValidateEnvironment checks an environment name.
func ValidateEnvironment(s string) error {
	if s == "" || len(s) > maxName || !environmentRE.MatchString(s) {
		return invalid("environment %q: use letters, digits, '_' or '-'", truncate(s))
	}
	return nil
}

// ValidatePolicy checks a policy name or policy group.
func ValidatePolicy(what, s string) error {
	if s == "" || len(s) > maxName || !policyRE.MatchString(s) {
		return invalid("%s %q: use letters, digits, '_', '.', ':' or '-'", what, truncate(s))
	}
	return nil
}

// NormalizeRunList checks each item and writes bare recipe names the way the
// server stores them: "base" becomes "recipe[base]".
func NormalizeRunList(items []string) ([]string, error) {
	out := make([]string, 0, len(items))
	for _, it := range items {
		switch {
		case runListItemRE.MatchString(it):
			out = append(out, it)
		case bareRecipeRE.MatchString(it):
			out = append(out, "recipe["+it+"]")
		default:
			return nil, invalid("run list item %q: write recipe[NAME], recipe[COOKBOOK::RECIPE@VERSION] or role[NAME]", truncate(it))
		}
	}
	return out, nil
}

// NameVars are the values a node name template may use.
type NameVars struct {
	FQDN       string
	Hostname   string
	InstanceID string
	Region     string
}

// ExpandNodeName fills {fqdn}, {hostname}, {instance_id} and {region} in
// tmpl and validates the result.
func ExpandNodeName(tmpl string, v NameVars) (string, error) {
	vars := map[string]string{"{fqdn}": v.FQDN, "{hostname}": v.Hostname, "{instance_id}": v.InstanceID, "{region}": v.Region}
	var bad error
	name := placeholderRE.ReplaceAllStringFunc(tmpl, func(p string) string {
		val, ok := vars[p]
		if !ok && bad == nil {
			bad = invalid("node name %q: unknown placeholder %s (known: {fqdn}, {hostname}, {instance_id}, {region})", truncate(tmpl), p)
		}
		if ok && val == "" && bad == nil {
			bad = invalid("node name %q: %s is not known on this instance", truncate(tmpl), p)
		}
		return val
	})
	if bad != nil {
		return "", bad
	}
	return name, ValidateNodeName(name)
}

func truncate(s string) string {
	const limit = 80
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}

// rubyString renders s as a single-quoted Ruby literal. In single quotes
// Ruby interprets only \\ and \', so `#{}`, backticks and $ stay text.
// Control characters (newlines, NUL) and invalid UTF-8 have no place in any
// setting and are refused rather than escaped.
func rubyString(s string) (string, error) {
	if !utf8.ValidString(s) {
		return "", invalid("%q is not valid UTF-8", truncate(s))
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return "", invalid("%q has the control character %q", truncate(s), r)
		}
	}
	r := strings.NewReplacer(`\`, `\\`, `'`, `\'`)
	return "'" + r.Replace(s) + "'", nil
}

// ClientConfig is what client.rb says.
type ClientConfig struct {
	ServerURL    string
	NodeName     string
	ClientKey    string
	SSLVerify    bool
	AuthProtocol string
	// CAFile is a CA bundle for the Chef server (ssl_ca_file), or "".
	CAFile string
	// Environment, or PolicyName and PolicyGroup, or neither.
	Environment string
	PolicyName  string
	PolicyGroup string
	// License is chef_license (accept, accept-silent, accept-no-persist),
	// or "" to leave it to the image.
	License string
	// EncryptedDataBagSecret is the secret file's path, or "".
	EncryptedDataBagSecret string
	// LogLevel is a level name without its colon, or "" for chef-client's
	// default.
	LogLevel string
	// FileCachePath and FileBackupPath are where chef-client keeps
	// cookbooks and backups, or "" for its defaults.
	FileCachePath  string
	FileBackupPath string
	// PIDFile is chef-client's pid_file, or "".
	PIDFile string
	// JSONAttribs is json_attribs (a JSON file applied on every run), or "".
	JSONAttribs string
	// ShowTime sets whether chef-client's log lines carry the time (the
	// Mixlib::Log formatter's show_time); nil leaves it.
	ShowTime *bool
	// Proxies are chef-client's http_proxy, https_proxy and no_proxy.
	Proxies Proxies
}

// Proxies are the proxies to the Chef server: chef-client's settings, and
// the agent's own for its requests, over the environment's.
type Proxies struct {
	HTTP, HTTPS, No string
}

// set reports whether any proxy setting is given.
func (p Proxies) set() bool { return p.HTTP != "" || p.HTTPS != "" || p.No != "" }

// imdsAddresses are never proxied: a proxy would answer for another
// machine's metadata, or for none. bootagent's own IMDS client never
// takes a proxy; this keeps chef-client's (Ohai's ec2 plugin) off one too.
var imdsAddresses = []string{"169.254.169.254", "fd00:ec2::254"}

// noProxy is no_proxy with the IMDS addresses added.
func (p Proxies) noProxy() string { return withIMDS(p.No) }

// noProxyEntries splits a no_proxy list, which takes commas and spaces.
func noProxyEntries(noProxy string) []string {
	return strings.FieldsFunc(noProxy, func(r rune) bool { return r == ',' || r == ' ' })
}

// withIMDS is a no_proxy list with the IMDS addresses added.
func withIMDS(noProxy string) string {
	list := noProxyEntries(noProxy)
	for _, a := range imdsAddresses {
		if !slices.Contains(list, a) {
			list = append(list, a)
		}
	}
	return strings.Join(list, ",")
}

// inheritedNoProxy keeps the entries of an inherited no_proxy that are
// plain host, domain or address patterns, so that the line they go into
// means the same to systemd and to chef-client.
var inheritedNoProxy = regexp.MustCompile(`^[A-Za-z0-9._:*/\[\]-]+$`)

// Environment is the proxy part of chef-client's environment, in lower and
// upper case, each setting over the inherited one (env: the agent's own),
// as the agent's requests take them: chef-client exports client.rb's
// proxies only where the environment has none (ChefConfig's
// export_proxies), so an inherited HTTPS_PROXY would otherwise win over
// them. no_proxy is always set, with the IMDS addresses: an inherited proxy
// would otherwise carry Ohai's ec2 plugin to IMDS.
func (p Proxies) Environment(env func(string) string) []string {
	var lines []string
	add := func(name, value string) {
		lines = append(lines, name+"="+value, strings.ToUpper(name)+"="+value)
	}
	if p.HTTP != "" {
		add("http_proxy", p.HTTP)
	}
	if p.HTTPS != "" {
		add("https_proxy", p.HTTPS)
	}
	if p.No != "" {
		add("no_proxy", p.noProxy())
		return lines
	}
	var keep []string
	for _, name := range []string{"no_proxy", "NO_PROXY"} {
		for _, e := range noProxyEntries(env(name)) {
			if inheritedNoProxy.MatchString(e) && !slices.Contains(keep, e) {
				keep = append(keep, e)
			}
		}
	}
	add("no_proxy", withIMDS(strings.Join(keep, ",")))
	return lines
}

// trustedCertsDir is chef-client's own default for a root install, written
// out so that the file says everything.
const trustedCertsDir = "/etc/chef/trusted_certs"

// logLevel is what a log level written as a symbol may be: config
// validates it against the levels chef-client knows, and this keeps the
// symbol a symbol whatever a caller passes.
var logLevel = regexp.MustCompile(`^[a-z]+$`)

// RenderClientRB renders client.rb. Every value is a Ruby literal made by
// rubyString or a fixed symbol, so no setting can inject code.
func RenderClientRB(c ClientConfig) ([]byte, error) {
	if err := ValidateNodeName(c.NodeName); err != nil {
		return nil, err
	}
	w := &rbWriter{}
	w.b.WriteString("# Written by bootagent from its configuration, at registration and before a\n" +
		"# run when that changed; it rewrites this file. Put local settings in\n" +
		"# /etc/chef/client.d/*.rb, which chef-client also reads.\n")
	w.str("chef_server_url", c.ServerURL)
	w.str("node_name", c.NodeName)
	w.str("client_key", c.ClientKey)
	if c.SSLVerify {
		w.sym("ssl_verify_mode", ":verify_peer")
	} else {
		w.sym("ssl_verify_mode", ":verify_none")
	}
	w.str("trusted_certs_dir", trustedCertsDir)
	if c.CAFile != "" {
		w.str("ssl_ca_file", c.CAFile)
	}
	w.str("authentication_protocol_version", c.AuthProtocol)
	switch {
	case c.PolicyName != "":
		w.str("policy_name", c.PolicyName)
		w.str("policy_group", c.PolicyGroup)
	case c.Environment != "":
		w.str("environment", c.Environment)
	}
	w.optional("file_cache_path", c.FileCachePath)
	w.optional("file_backup_path", c.FileBackupPath)
	w.optional("encrypted_data_bag_secret", c.EncryptedDataBagSecret)
	if c.Proxies.set() {
		w.optional("http_proxy", c.Proxies.HTTP)
		w.optional("https_proxy", c.Proxies.HTTPS)
		w.str("no_proxy", c.Proxies.noProxy())
	}
	w.optional("pid_file", c.PIDFile)
	w.optional("json_attribs", c.JSONAttribs)
	w.optional("chef_license", c.License)
	if c.LogLevel != "" && w.symbolic("log_level", c.LogLevel) {
		w.sym("log_level", ":"+c.LogLevel)
	}
	// chef-client's output goes to the agent (or the run's journal stream),
	// which keeps it with the run's id.
	w.sym("log_location", "STDOUT")
	if c.ShowTime != nil {
		// cloud-init writes Chef::Log::Formatter.show_time, which hands
		// Mixlib::Log its argument list ([false], which is true): only the
		// formatter's own setter turns the time off.
		fmt.Fprintf(&w.b, "Mixlib::Log::Formatter.show_time = %t\n", *c.ShowTime)
	}
	if w.err != nil {
		return nil, w.err
	}
	return w.b.Bytes(), nil
}

// rbWriter writes "setting value" lines and keeps the first error.
type rbWriter struct {
	b   bytes.Buffer
	err error
}

func (w *rbWriter) str(key, value string) {
	lit, err := rubyString(value)
	if err != nil && w.err == nil {
		w.err = &SettingError{Setting: key, Err: err}
	}
	w.sym(key, lit)
}

// SettingError is a value client.rb cannot hold, naming the client.rb
// setting.
type SettingError struct {
	Setting string
	Err     error
}

func (e *SettingError) Error() string { return "client.rb " + e.Setting + ": " + e.Err.Error() }

func (e *SettingError) Unwrap() error { return e.Err }

func (w *rbWriter) sym(key, value string) { fmt.Fprintf(&w.b, "%-32s %s\n", key, value) }

// optional writes a string setting only when it is set.
func (w *rbWriter) optional(key, value string) {
	if value != "" {
		w.str(key, value)
	}
}

// symbolic reports whether value can be written as a symbol for key, and
// records the first setting that cannot.
func (w *rbWriter) symbolic(key, value string) bool {
	if logLevel.MatchString(value) {
		return true
	}
	if w.err == nil {
		w.err = &SettingError{Setting: key, Err: invalid("%q is not a log level", truncate(value))}
	}
	return false
}

// FirstBoot is what first-boot.json gives chef-client's first run (-j).
type FirstBoot struct {
	RunList     []string
	PolicyName  string
	PolicyGroup string
	Attributes  map[string]any
}

// reservedAttributes are keys of first-boot.json that chef-client reads as
// settings, not attributes.
var reservedAttributes = []string{"run_list", "policy_name", "policy_group"}

// RenderFirstBoot renders first-boot.json: the initial attributes at the top
// level, as chef-client -j takes them, with the run list or the policy.
func RenderFirstBoot(f FirstBoot) ([]byte, error) {
	doc := make(map[string]any, len(f.Attributes)+2)
	for k, v := range f.Attributes {
		for _, r := range reservedAttributes {
			if k == r {
				return nil, invalid("initial attribute %q would override the node's %s; remove it", k, r)
			}
		}
		doc[k] = v
	}
	if f.PolicyName != "" {
		doc["policy_name"], doc["policy_group"] = f.PolicyName, f.PolicyGroup
	} else {
		doc["run_list"] = nonNil(f.RunList)
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, invalid("initial attributes: %v", err)
	}
	return append(out, '\n'), nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
