// Package config owns the agent's settings: the YAML file baked into the
// image, its defaults and validation, and the decoding of the instance's
// user-data, which overrides the file per instance.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// DefaultPath is where the package installs the config file.
const DefaultPath = "/etc/bootagent/config.yaml"

// maxFileSize bounds the config file; a real one is a few hundred bytes, so
// anything near this is a mistake (a key or a log pointed at by --config).
const maxFileSize = 1 << 20

// ErrInvalid is matched by every error about bad settings, from the file or
// from user-data, so that callers can tell bad input (exit 2) from failures.
var ErrInvalid = errors.New("invalid settings")

// InvalidError says which setting was wrong, where it came from and why.
type InvalidError struct {
	// Source names where the value came from: a config file line or a
	// user-data key.
	Source string
	// Reason says what is wrong and, where it helps, what to do.
	Reason string
}

func (e *InvalidError) Error() string {
	if e.Source == "" {
		return e.Reason
	}
	return e.Source + ": " + e.Reason
}

// Is makes errors.Is(err, ErrInvalid) true.
func (e *InvalidError) Is(target error) bool { return target == ErrInvalid }

// Config is the agent's effective configuration.
type Config struct {
	IMDS     IMDS     `yaml:"imds" json:"imds"`
	Hostname Hostname `yaml:"hostname" json:"hostname"`
	Chef     Chef     `yaml:"chef" json:"chef"`
	Metrics  Metrics  `yaml:"metrics" json:"metrics"`

	// sources maps a key path such as "hostname.name" to where its value was
	// set, for error messages; keys absent from it hold defaults.
	sources map[string]string
}

// IMDS configures access to the instance metadata service.
type IMDS struct {
	Endpoint string `yaml:"endpoint" json:"endpoint"`
	// EndpointMode picks the SDK's default endpoint when Endpoint is
	// empty: EndpointModeIPv4 (169.254.169.254) or EndpointModeIPv6
	// ([fd00:ec2::254], for IPv6-only subnets on Nitro instances); ""
	// takes AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE, else IPv4.
	EndpointMode string `yaml:"endpoint_mode" json:"endpoint_mode"`
	AllowIMDSv1  bool   `yaml:"allow_imdsv1" json:"allow_imdsv1"`
	// AllowUsers, when not empty, limits IMDS to these users (names or
	// uids) and the agent's own: every other user's connection to it is
	// refused by the agent's nftables table. Empty leaves IMDS open to
	// every process of the instance.
	AllowUsers   []string `yaml:"allow_users" json:"allow_users"`
	TokenTTL     Duration `yaml:"token_ttl" json:"token_ttl"`
	WaitTimeout  Duration `yaml:"wait_timeout" json:"wait_timeout"`
	PollInterval Duration `yaml:"poll_interval" json:"poll_interval"`
}

// IPv6 reports whether the SDK's default endpoint is its IPv6 one.
func (i IMDS) IPv6() bool { return i.EndpointMode == EndpointModeIPv6 }

// EndpointAddr is the address and port of Endpoint, when it is set and
// names its host by address (Validate requires it when AllowUsers is set):
// a packet filter matches addresses, not names.
func (i IMDS) EndpointAddr() (netip.AddrPort, bool) {
	u, err := url.Parse(i.Endpoint)
	if i.Endpoint == "" || err != nil {
		return netip.AddrPort{}, false
	}
	addr, err := netip.ParseAddr(u.Hostname())
	if err != nil {
		return netip.AddrPort{}, false
	}
	port := uint64(80)
	if u.Scheme == "https" {
		port = 443
	}
	if p := u.Port(); p != "" {
		if port, err = strconv.ParseUint(p, 10, 16); err != nil {
			return netip.AddrPort{}, false
		}
	}
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), true
}

// Hostname configures how the instance is named.
type Hostname struct {
	// Name is the host name, short or fully qualified; normally it comes
	// from user-data.
	Name string `yaml:"name" json:"name"`
	// Domain completes a short Name into an FQDN.
	Domain         string `yaml:"domain" json:"domain"`
	PreferFQDN     bool   `yaml:"prefer_fqdn" json:"prefer_fqdn"`
	FromTag        string `yaml:"from_tag" json:"from_tag"`
	Fallback       string `yaml:"fallback" json:"fallback"`
	ManageEtcHosts bool   `yaml:"manage_etc_hosts" json:"manage_etc_hosts"`
	// Preserve leaves the host name alone entirely, like cloud-init's
	// preserve_hostname.
	Preserve bool `yaml:"preserve" json:"preserve"`
}

// Fallback values: what names the instance when neither user-data nor a tag
// does.
const (
	FallbackIMDS = "imds"
	FallbackKeep = "keep"
)

// Chef configures registration with a Chef Infra Server and chef-client runs.
type Chef struct {
	ServerURL string `yaml:"server_url" json:"server_url"`
	// AuthProtocol is the request signing version: 1.3 (SHA-256), or 1.0
	// for old servers.
	AuthProtocol         string   `yaml:"auth_protocol" json:"auth_protocol"`
	ValidationClientName string   `yaml:"validation_client_name" json:"validation_client_name"`
	ValidationKey        string   `yaml:"validation_key" json:"validation_key"`
	DeleteValidationKey  bool     `yaml:"delete_validation_key" json:"delete_validation_key"`
	ClientKey            string   `yaml:"client_key" json:"client_key"`
	NodeName             string   `yaml:"node_name" json:"node_name"`
	Environment          string   `yaml:"environment" json:"environment"`
	RunList              []string `yaml:"run_list" json:"run_list"`
	PolicyName           string   `yaml:"policy_name" json:"policy_name"`
	PolicyGroup          string   `yaml:"policy_group" json:"policy_group"`
	InitialAttributes    Object   `yaml:"initial_attributes" json:"initial_attributes"`
	ClientCommand        []string `yaml:"client_command" json:"client_command"`
	Interval             Duration `yaml:"interval" json:"interval"`
	Splay                Duration `yaml:"splay" json:"splay"`
	RunTimeout           Duration `yaml:"run_timeout" json:"run_timeout"`
	// RequestBudget is how long the Chef server requests of one
	// registration are tried for, retries included, before the pass fails.
	RequestBudget Duration `yaml:"request_budget" json:"request_budget"`
	SSLVerify     bool     `yaml:"ssl_verify" json:"ssl_verify"`
	TrustedCerts  string   `yaml:"trusted_certs" json:"trusted_certs"`
	// License is chef-client's chef_license: accept, accept-silent or
	// accept-no-persist; empty leaves the acceptance to the image.
	License string `yaml:"license" json:"license"`
	// LicenseKeyFile is a file (0600) holding a Chef Infra Client 19
	// license key, handed to chef-client as CHEF_LICENSE_KEY in its
	// environment; "" for none.
	LicenseKeyFile string `yaml:"license_key_file" json:"license_key_file"`
	// The chef-client settings below are written to client.rb as given;
	// an empty path is not written (chef-client's default holds).
	EncryptedDataBagSecret string `yaml:"encrypted_data_bag_secret" json:"encrypted_data_bag_secret"`
	// LogLevel is chef-client's log_level, without the colon; empty is
	// chef-client's default (auto).
	LogLevel       string `yaml:"log_level" json:"log_level"`
	FileCachePath  string `yaml:"file_cache_path" json:"file_cache_path"`
	FileBackupPath string `yaml:"file_backup_path" json:"file_backup_path"`
	PIDFile        string `yaml:"pid_file" json:"pid_file"`
	// FirstBootPath is where the first run's JSON (run list, policy and
	// initial attributes) is written, for chef-client's -j on that run
	// (cloud-init's firstboot_path).
	FirstBootPath string `yaml:"firstboot_path" json:"firstboot_path"`
	// JSONAttribs is client.rb's json_attribs: a JSON file chef-client
	// applies on every run, not only the first; "" for none. cloud-init
	// points it at its first-boot file, which resets the run list on each
	// run; set it to chef.firstboot_path to keep that behaviour.
	JSONAttribs string `yaml:"json_attribs" json:"json_attribs"`
	// ShowTime is whether chef-client's log lines carry the time (written
	// to client.rb as Mixlib::Log::Formatter.show_time); nil leaves
	// chef-client's default.
	ShowTime *bool `yaml:"show_time" json:"show_time"`
	// Exec runs chef-client; false registers the node and writes its
	// files only (cloud-init's chef exec), for an image whose own
	// tooling runs chef-client.
	Exec bool `yaml:"exec" json:"exec"`
	// HTTPProxy, HTTPSProxy and NoProxy are chef-client's proxy settings,
	// which the agent's own Chef server requests use too, over the
	// environment's (HTTPS_PROXY and the like).
	HTTPProxy  string `yaml:"http_proxy" json:"http_proxy"`
	HTTPSProxy string `yaml:"https_proxy" json:"https_proxy"`
	NoProxy    string `yaml:"no_proxy" json:"no_proxy"`
	// DeregisterOnTermination removes the node and client from the Chef
	// server when IMDS announces that the instance is being terminated.
	DeregisterOnTermination bool `yaml:"deregister_on_termination" json:"deregister_on_termination"`
	// FinalRun makes one last chef-client run before deregistering, within
	// the time the termination notice leaves.
	FinalRun bool `yaml:"final_run" json:"final_run"`

	// ValidationCert is a validator key given inline in user-data
	// (cloud-init's chef.validation_cert); it is never read from the file
	// and never printed.
	ValidationCert string `yaml:"-" json:"-"`
}

// maxRequestBudget keeps a registration that fails inside the unit's
// TimeoutStartSec=15min, with room for the wait for IMDS:
// the pass fails, and says why, before systemd gives up on the start.
const maxRequestBudget = 10 * time.Minute

// Enabled reports whether the Chef steps run: only when a server is named.
func (c Chef) Enabled() bool { return c.ServerURL != "" }

// checkFirstBootPath keeps the first-boot JSON, which user-data may place,
// to a .json file directly in chef-client's own directory, and off every
// other file the agent or chef-client reads: written as root (0600) and
// given to chef-client, it must not replace a key, a secret or anything
// outside Chef's files.
func checkFirstBootPath(ch Chef) error {
	p := ch.FirstBootPath
	if dir := filepath.Dir(p); filepath.Clean(p) != p || (dir != "/etc/chef" && dir != "/etc/cinc") || filepath.Ext(p) != ".json" {
		return fmt.Errorf("%q must be a .json file in /etc/chef or /etc/cinc", p)
	}
	for _, other := range []struct{ key, path string }{
		{"chef.client_key", ch.ClientKey},
		{"chef.validation_key", ch.ValidationKey},
		{"chef.license_key_file", ch.LicenseKeyFile},
		{"chef.encrypted_data_bag_secret", ch.EncryptedDataBagSecret},
		{"chef.trusted_certs", ch.TrustedCerts},
	} {
		if other.path != "" && filepath.Clean(other.path) == p {
			return fmt.Errorf("%q is %s's file too", p, other.key)
		}
	}
	return nil
}

// Cinc reports whether chef.client_command runs Cinc (cinc-client), whose
// own files live under /etc/cinc and which has no license to accept.
func (c Chef) Cinc() bool {
	return len(c.ClientCommand) > 0 && strings.HasPrefix(filepath.Base(c.ClientCommand[0]), "cinc-")
}

// Metrics configures the Prometheus exposition.
type Metrics struct {
	// Textfile is a node_exporter textfile-collector file (*.prom).
	Textfile string `yaml:"textfile" json:"textfile"`
	// Listen is host:port for /metrics and /healthz.
	Listen string `yaml:"listen" json:"listen"`
	// AllowRemote lets Listen be other than loopback. The metrics name the
	// instance and its node, so by default only the machine itself (and a
	// local node_exporter or agent) may read them.
	AllowRemote bool `yaml:"allow_remote" json:"allow_remote"`
}

// Default returns the configuration used where neither the file nor
// user-data says otherwise.
func Default() Config {
	return Config{
		IMDS: IMDS{
			// Six hours is the longest token IMDS grants; the agent
			// runs for the life of the instance, so fewer token
			// requests is better.
			TokenTTL:     Duration(6 * time.Hour),
			PollInterval: Duration(5 * time.Second),
			AllowUsers:   []string{},
		},
		Hostname: Hostname{
			PreferFQDN:     true,
			Fallback:       FallbackIMDS,
			ManageEtcHosts: true,
		},
		Chef: Chef{
			AuthProtocol:         "1.3",
			ValidationClientName: "chef-validator",
			ValidationKey:        "/etc/chef/validation.pem",
			DeleteValidationKey:  true,
			ClientKey:            "/etc/chef/client.pem",
			NodeName:             "{fqdn}",
			ClientCommand:        []string{"chef-client"},
			Interval:             Duration(30 * time.Minute),
			Splay:                Duration(5 * time.Minute),
			RunTimeout:           Duration(time.Hour),
			RequestBudget:        Duration(5 * time.Minute),
			FileCachePath:        "/var/cache/chef",
			FileBackupPath:       "/var/backups/chef",
			FirstBootPath:        "/etc/chef/first-boot.json",
			Exec:                 true,
			SSLVerify:            true,
			// Stale nodes are the first complaint of Chef users in Auto
			// Scaling groups, so cleaning up is the default.
			DeregisterOnTermination: true,
		},
	}
}

// Load reads the config file at path over the defaults and validates it. A
// missing file is an error unless missingOK, in which case the defaults are
// returned: an image without a config file still names its instances.
func Load(path string, missingOK bool) (Config, error) {
	data, err := readLimited(path)
	if err != nil {
		if missingOK && errors.Is(err, os.ErrNotExist) {
			return Default(), nil
		}
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	cfg, err := Parse(data, "config "+path)
	if err != nil {
		return Config{}, err
	}
	return cfg, nil
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxFileSize {
		return nil, &InvalidError{Source: "config " + path, Reason: fmt.Sprintf("file is larger than %d bytes; is this the config file?", maxFileSize)}
	}
	return data, nil
}

// Parse decodes a config file's content over the defaults and validates it.
// source names the file in errors.
func Parse(data []byte, source string) (Config, error) {
	cfg := Default()
	if err := decodeStrict(data, &cfg, source, true); err != nil {
		return Config{}, err
	}
	root, err := singleDocument(data)
	if err != nil {
		return Config{}, &InvalidError{Source: source, Reason: cleanYAMLError(err, true)}
	}
	cfg.sources = map[string]string{}
	recordLines(root, "", source, cfg.sources)
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// decodeStrict decodes YAML onto cfg, refusing unknown keys, more than one
// document, and values of the wrong type.
func decodeStrict(data []byte, cfg *Config, source string, withLines bool) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // An empty file: the defaults stand.
		}
		return &InvalidError{Source: source, Reason: cleanYAMLError(err, withLines)}
	}
	if err := noSecondDocument(dec); err != nil {
		return &InvalidError{Source: source, Reason: cleanYAMLError(err, withLines)}
	}
	return nil
}

// singleDocument parses data, which must hold at most one YAML document,
// into its document node; an empty stream gives a node without content.
// PyYAML's safe_load, and so cloud-init, refuses a stream of more than one
// document, and bootagent does too rather than read the first and drop the
// others without a word.
func singleDocument(data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if err := noSecondDocument(dec); err != nil {
		return nil, err
	}
	return &doc, nil
}

// noSecondDocument checks that dec, having decoded the first document of
// its stream, is at the end of it. A second document, empty or not, is
// refused at the line where it starts; one that does not parse, with the
// parser's error.
func noSecondDocument(dec *yaml.Decoder) error {
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case errors.Is(err, io.EOF):
		return nil
	case err != nil:
		return err
	}
	return fmt.Errorf("line %d: more than one YAML document (the second starts here); keep one", extra.Line)
}

var (
	unknownFieldRE = regexp.MustCompile(`field (\S+) not found in type config\.(\w+)`)
	lineRE         = regexp.MustCompile(`^line \d+: `)
	sectionOfType  = map[string]string{
		"Config":   "at the top level (known: imds, hostname, chef, metrics)",
		"IMDS":     "in imds",
		"Hostname": "in hostname",
		"Chef":     "in chef",
		"Metrics":  "in metrics",
	}
)

// cleanYAMLError turns the YAML library's messages, which name Go types,
// into ones that name config keys.
func cleanYAMLError(err error, withLines bool) string {
	var msgs []string
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs = te.Errors
	} else {
		msgs = []string{strings.TrimPrefix(err.Error(), "yaml: ")}
	}
	out := make([]string, 0, len(msgs))
	for _, m := range msgs {
		m = unknownFieldRE.ReplaceAllStringFunc(m, func(s string) string {
			sub := unknownFieldRE.FindStringSubmatch(s)
			return fmt.Sprintf("unknown key %q %s", sub[1], sectionOfType[sub[2]])
		})
		m = strings.ReplaceAll(m, "config.Duration", "a duration such as 30m")
		if !withLines {
			m = lineRE.ReplaceAllString(m, "")
		}
		out = append(out, m)
	}
	return strings.Join(out, "; ")
}

// recordLines notes the file line of every scalar setting, so that
// validation errors can point at it.
func recordLines(n *yaml.Node, prefix, source string, into map[string]string) {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			recordLines(c, prefix, source, into)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			key := n.Content[i].Value
			if prefix != "" {
				key = prefix + "." + key
			}
			into[key] = fmt.Sprintf("%s line %d", source, n.Content[i].Line)
			if strings.Count(key, ".") == 0 {
				recordLines(n.Content[i+1], key, source, into)
			}
		}
	}
}

// Source names where the value of key (a dotted path such as
// "hostname.name") came from, or "default" when nothing set it.
func (c Config) Source(key string) string {
	if s, ok := c.sources[key]; ok {
		return s
	}
	return "default " + key
}

// Sources returns a copy of the map from key to where it was set.
func (c Config) Sources() map[string]string {
	out := make(map[string]string, len(c.sources))
	for k, v := range c.sources {
		out[k] = v
	}
	return out
}

// setSource records that key was set by source.
func (c *Config) setSource(key, source string) {
	if c.sources == nil {
		c.sources = map[string]string{}
	}
	c.sources[key] = source
}

// clone returns a deep enough copy that overlaying the result leaves c as
// it was.
func (c Config) clone() Config {
	out := c
	out.sources = c.Sources()
	out.IMDS.AllowUsers = slices.Clone(c.IMDS.AllowUsers)
	out.Chef.RunList = slices.Clone(c.Chef.RunList)
	out.Chef.ClientCommand = slices.Clone(c.Chef.ClientCommand)
	out.Chef.InitialAttributes = c.Chef.InitialAttributes.clone()
	return out
}

// invalid returns an error about key, naming where its value came from.
func (c Config) invalid(key, format string, args ...any) error {
	return &InvalidError{Source: c.Source(key), Reason: key + ": " + fmt.Sprintf(format, args...)}
}

// Validate checks every setting the config package owns; host names and
// Chef names are checked by the packages that use them.
func (c Config) Validate() error {
	var errs []error
	if m := c.IMDS.EndpointMode; m != "" && m != EndpointModeIPv4 && m != EndpointModeIPv6 {
		errs = append(errs, c.invalid("imds.endpoint_mode", "%q is not ipv4 or ipv6", m))
	}
	if c.IMDS.Endpoint != "" {
		if err := checkURL(c.IMDS.Endpoint); err != nil {
			errs = append(errs, c.invalid("imds.endpoint", "%v", err))
		} else if _, ok := c.IMDS.EndpointAddr(); !ok && len(c.IMDS.AllowUsers) > 0 {
			errs = append(errs, c.invalid("imds.endpoint", "%q names its host by name, and imds.allow_users filters IMDS by address: give the endpoint's IP address", c.IMDS.Endpoint))
		}
	}
	for _, u := range c.IMDS.AllowUsers {
		if !validUser(u) {
			errs = append(errs, c.invalid("imds.allow_users", "%q is not a user name or a uid", u))
		}
	}
	// IMDS grants tokens of 1 s to 6 h.
	if ttl := c.IMDS.TokenTTL.D(); ttl < time.Second || ttl > 6*time.Hour {
		errs = append(errs, c.invalid("imds.token_ttl", "%s is outside what IMDS grants (1s to 6h)", ttl))
	}
	if c.IMDS.WaitTimeout < 0 {
		errs = append(errs, c.invalid("imds.wait_timeout", "must not be negative (0 waits forever)"))
	}
	if p := c.IMDS.PollInterval.D(); p < 100*time.Millisecond {
		errs = append(errs, c.invalid("imds.poll_interval", "%s is too short; use 100ms or more", p))
	}
	switch c.Hostname.Fallback {
	case FallbackIMDS, FallbackKeep:
	default:
		errs = append(errs, c.invalid("hostname.fallback", "%q is not one of imds, keep", c.Hostname.Fallback))
	}
	if c.Hostname.FromTag != "" && !validTagKey(c.Hostname.FromTag) {
		errs = append(errs, c.invalid("hostname.from_tag", "%q is not a tag key IMDS can serve (letters, digits, and + - = . , _ : @, up to 128)", c.Hostname.FromTag))
	}
	errs = append(errs, c.validateChef()...)
	errs = append(errs, c.validateMetrics()...)
	return errors.Join(errs...)
}

func (c Config) validateChef() []error {
	var errs []error
	ch := c.Chef
	if ch.ServerURL != "" {
		if err := checkURL(ch.ServerURL); err != nil {
			errs = append(errs, c.invalid("chef.server_url", "%v", err))
		}
	}
	if ch.AuthProtocol != "1.3" && ch.AuthProtocol != "1.0" {
		errs = append(errs, c.invalid("chef.auth_protocol", "%q is not 1.3 or 1.0", ch.AuthProtocol))
	}
	if (ch.PolicyName == "") != (ch.PolicyGroup == "") {
		errs = append(errs, c.invalid("chef.policy_name", "policy_name and policy_group go together; set both or neither"))
	}
	if ch.PolicyName != "" && len(ch.RunList) > 0 {
		errs = append(errs, c.invalid("chef.run_list", "a node with a policy (policy_name %q) takes its run list from the policy; drop run_list", ch.PolicyName))
	}
	if ch.PolicyName != "" && ch.Environment != "" {
		errs = append(errs, c.invalid("chef.environment", "a node with a policy (policy_name %q) uses policy_group, not environments; drop environment", ch.PolicyName))
	}
	if len(ch.ClientCommand) == 0 || ch.ClientCommand[0] == "" {
		errs = append(errs, c.invalid("chef.client_command", "must name a program, for example [chef-client]"))
	}
	if ch.Interval.D() < time.Minute {
		errs = append(errs, c.invalid("chef.interval", "%s is too short; use 1m or more", ch.Interval.D()))
	}
	if ch.Splay < 0 {
		errs = append(errs, c.invalid("chef.splay", "must not be negative"))
	}
	if ch.RunTimeout.D() < time.Second {
		errs = append(errs, c.invalid("chef.run_timeout", "%s is too short", ch.RunTimeout.D()))
	}
	if b := ch.RequestBudget.D(); b < time.Second || b > maxRequestBudget {
		errs = append(errs, c.invalid("chef.request_budget", "%s is out of range; use 1s to %s", b, maxRequestBudget))
	}
	for _, k := range []struct{ key, path string }{
		{"chef.validation_key", ch.ValidationKey},
		{"chef.client_key", ch.ClientKey},
		{"chef.file_cache_path", ch.FileCachePath},
		{"chef.file_backup_path", ch.FileBackupPath},
	} {
		if !strings.HasPrefix(k.path, "/") {
			errs = append(errs, c.invalid(k.key, "%q must be an absolute path", k.path))
		}
	}
	for _, k := range []struct{ key, path string }{
		{"chef.trusted_certs", ch.TrustedCerts},
		{"chef.encrypted_data_bag_secret", ch.EncryptedDataBagSecret},
		{"chef.pid_file", ch.PIDFile},
		{"chef.license_key_file", ch.LicenseKeyFile},
		{"chef.json_attribs", ch.JSONAttribs},
	} {
		if k.path != "" && !strings.HasPrefix(k.path, "/") {
			errs = append(errs, c.invalid(k.key, "%q must be an absolute path", k.path))
		}
	}
	if err := checkFirstBootPath(ch); err != nil {
		errs = append(errs, c.invalid("chef.firstboot_path", "%v", err))
	}
	for _, k := range []struct{ key, url string }{
		{"chef.http_proxy", ch.HTTPProxy},
		{"chef.https_proxy", ch.HTTPSProxy},
	} {
		if k.url == "" {
			continue
		}
		if err := checkURL(k.url); err != nil {
			errs = append(errs, c.invalid(k.key, "%v", err))
		} else if u, _ := url.Parse(k.url); u.User != nil {
			// client.rb is world-readable, and the URL is logged.
			errs = append(errs, c.invalid(k.key, "a proxy URL must not carry a user or password (they would be in client.rb and the logs); give the proxy's address alone"))
		} else if !proxyChars.MatchString(k.url) {
			errs = append(errs, c.invalid(k.key, "%q: a proxy address is a scheme, a host and a port (letters, digits and . - : / [ ])", k.url))
		}
	}
	if ch.NoProxy != "" && !noProxyChars.MatchString(ch.NoProxy) {
		errs = append(errs, c.invalid("chef.no_proxy", "%q: hosts, domains and addresses separated by commas or spaces (letters, digits and . - : * / [ ])", ch.NoProxy))
	}
	if ch.License != "" && !slices.Contains(ChefLicenses, ch.License) {
		errs = append(errs, c.invalid("chef.license", "%q is not one of %s (or empty, to leave it to the image)", ch.License, strings.Join(ChefLicenses, ", ")))
	}
	if ch.LogLevel != "" && !slices.Contains(ChefLogLevels, ch.LogLevel) {
		errs = append(errs, c.invalid("chef.log_level", "%q is not one of %s (or empty)", ch.LogLevel, strings.Join(ChefLogLevels, ", ")))
	}
	return errs
}

// proxyChars and noProxyChars are what proxy settings are made of: they go
// into chef-client's environment file as they are, where a quote, a
// backslash or a # would be read differently by systemd.
var (
	proxyChars   = regexp.MustCompile(`^[A-Za-z0-9._:/\[\]-]+$`)
	noProxyChars = regexp.MustCompile(`^[A-Za-z0-9._:*/\[\], -]+$`)
)

// The IMDS endpoint modes, the SDK's.
const (
	EndpointModeIPv4 = "ipv4"
	EndpointModeIPv6 = "ipv6"
)

// The AWS SDKs' variables for IMDS's endpoint and its endpoint mode.
const (
	EndpointEnv     = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
	EndpointModeEnv = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"
)

// FromEnvironment takes the SDKs' IMDS variables into the settings the
// config file leaves empty, as the SDK would use them (the endpoint mode in
// any case), so that the agent knows the endpoint its requests go to, which
// imds.allow_users filters. getenv is os.Getenv. A bad value is an
// *InvalidError naming the variable.
func (c *Config) FromEnvironment(getenv func(string) string) error {
	if c.IMDS.EndpointMode == "" {
		switch m := strings.ToLower(strings.TrimSpace(getenv(EndpointModeEnv))); m {
		case "", EndpointModeIPv4, EndpointModeIPv6:
			c.IMDS.EndpointMode = m
			if m != "" {
				c.setSource("imds.endpoint_mode", EndpointModeEnv)
			}
		default:
			return &InvalidError{Source: EndpointModeEnv, Reason: fmt.Sprintf("%q is not ipv4 or ipv6", getenv(EndpointModeEnv))}
		}
	}
	if e := getenv(EndpointEnv); c.IMDS.Endpoint == "" && e != "" {
		c.IMDS.Endpoint = e
		c.setSource("imds.endpoint", EndpointEnv)
	}
	return c.Validate()
}

// ChefLicenses are the license acceptance values chef-client knows
// (client.rb's chef_license, CHEF_LICENSE, --chef-license).
var ChefLicenses = []string{"accept", "accept-silent", "accept-no-persist"}

// ChefLogLevels are chef-client's log levels.
var ChefLogLevels = []string{"auto", "trace", "debug", "info", "warn", "error", "fatal"}

func (c Config) validateMetrics() []error {
	var errs []error
	m := c.Metrics
	if m.Textfile != "" && (!strings.HasPrefix(m.Textfile, "/") || !strings.HasSuffix(m.Textfile, ".prom")) {
		errs = append(errs, c.invalid("metrics.textfile", "%q must be an absolute path ending in .prom (node_exporter reads only those)", m.Textfile))
	}
	if m.Listen == "" {
		return errs
	}
	host, _, err := net.SplitHostPort(m.Listen)
	if err != nil {
		return append(errs, c.invalid("metrics.listen", "%q is not host:port", m.Listen))
	}
	ip := net.ParseIP(host)
	if !m.AllowRemote && host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		errs = append(errs, c.invalid("metrics.listen", "%q is not a loopback address; use 127.0.0.1:PORT, or set metrics.allow_remote: true to serve other machines", m.Listen))
	}
	return errs
}

func checkURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%q is not a URL", s)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("%q must start with http:// or https://", s)
	}
	if u.Host == "" {
		return fmt.Errorf("%q names no host", s)
	}
	return nil
}

// userRE matches the user names useradd(8) and systemd accept.
var userRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?$`)

// validUser reports whether s is a user name or a uid (not the 32-bit
// value that means "no user").
func validUser(s string) bool {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return n != 1<<32-1
	}
	return userRE.MatchString(s)
}

// validTagKey reports whether key can be read from IMDS's instance tags,
// which serves only tag keys made of these characters.
func validTagKey(key string) bool {
	if key == "" || len(key) > 128 {
		return false
	}
	for _, r := range key {
		if !isAlnum(r) && !strings.ContainsRune("+-=._:@,", r) {
			return false
		}
	}
	return key != "." && key != ".." && key != "_index"
}

func isAlnum(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9'
}
