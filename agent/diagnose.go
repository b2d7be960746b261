package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/imdsfilter"
)

// Finding results.
const (
	DiagOK   = "ok"
	DiagWarn = "warn"
	DiagFail = "FAIL"
	DiagSkip = "skip"
)

// Finding is one line of `bootagent diagnose`: what was checked, how it went,
// and what to do about it.
type Finding struct {
	Name   string `json:"name"`
	Result string `json:"result"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// Diagnosis is every finding, in order.
type Diagnosis []Finding

// Failed reports whether any check failed.
func (d Diagnosis) Failed() bool {
	for _, c := range d {
		if c.Result == DiagFail {
			return true
		}
	}
	return false
}

// WriteText prints one line per check, and the fix under each failure or
// warning.
func (d Diagnosis) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, c := range d {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Result, c.Name, c.Detail)
		if c.Fix != "" && c.Result != DiagOK {
			fmt.Fprintf(tw, "\t\tfix: %s\n", c.Fix)
		}
	}
	return tw.Flush()
}

// probeTimeout bounds each check, so that a hanging peer makes a failed
// line, not a hung command.
const probeTimeout = 10 * time.Second

// Diagnose checks what the agent depends on, one line each: IMDS, its
// token, IMDSv1, the user-data, name resolution, the Chef server, its clock
// and the node's key, chef-client, and the units.
func Diagnose(ctx context.Context, root string, cfg config.Config, log *zap.Logger) Diagnosis {
	md := imds.New(imds.Options{Endpoint: cfg.IMDS.Endpoint, IPv6: cfg.IMDS.IPv6(), AllowIMDSv1: cfg.IMDS.AllowIMDSv1, TokenTTL: cfg.IMDS.TokenTTL.D(), Log: zap.NewNop()})
	st, _ := loadState(root)
	var d Diagnosis
	add := func(c Finding) { d = append(d, c) }

	withTimeout := func(f func(context.Context)) {
		cctx, cancel := context.WithTimeout(ctx, probeTimeout)
		defer cancel()
		f(cctx)
	}
	withTimeout(func(ctx context.Context) {
		for _, c := range checkIMDS(ctx, md) {
			add(c)
		}
	})
	withTimeout(func(ctx context.Context) { add(checkToken(ctx, md)) })
	var cfgWithUserData config.Config
	withTimeout(func(ctx context.Context) {
		var c Finding
		c, cfgWithUserData = checkUserData(ctx, md, cfg)
		add(c)
	})
	withTimeout(func(ctx context.Context) { add(checkFilter(ctx, imdsfilter.New(filterTimeout), cfgWithUserData)) })
	add(checkResolution(root, st))
	if !cfgWithUserData.Chef.Enabled() {
		add(Finding{Name: "Chef server", Result: DiagSkip, Detail: "no chef.server_url: the Chef steps are off"})
		return d
	}
	withTimeout(func(ctx context.Context) {
		for _, c := range checkChefServer(ctx, root, cfgWithUserData, st) {
			add(c)
		}
	})
	add(checkChefClient(cfgWithUserData))
	withTimeout(func(ctx context.Context) {
		add(checkLicense(root, cfgWithUserData, licenseEnvironment(ctx, root)))
	})
	add(checkUnits(root))
	return d
}

// checkIMDS makes one request without a token: whether IMDS answers it
// tells both whether IMDS is reachable and whether IMDSv1 is on.
func checkIMDS(ctx context.Context, md *imds.Client) []Finding {
	reach := Finding{Name: "IMDS reachable"}
	enabled, err := md.ProbeIMDSv1(ctx)
	if err != nil {
		reach.Result, reach.Detail = DiagFail, fmt.Sprintf("%s does not answer: %v", md, err)
		reach.Fix = "check the instance's metadata options (MetadataOptions.HttpEndpoint enabled), or imds.endpoint"
		return []Finding{reach}
	}
	reach.Result, reach.Detail = DiagOK, md.String()+" answers"
	v1 := Finding{Name: "IMDSv1"}
	if enabled {
		v1.Result, v1.Detail = DiagWarn, "enabled: any process on the instance can read metadata without a session token"
		v1.Fix = "require IMDSv2: aws ec2 modify-instance-metadata-options --instance-id ID --http-tokens required"
	} else {
		v1.Result, v1.Detail = DiagOK, "disabled: IMDSv2 only"
	}
	return []Finding{reach, v1}
}

func checkToken(ctx context.Context, md *imds.Client) Finding {
	c := Finding{Name: "IMDSv2 token"}
	took, err := md.ProbeToken(ctx)
	var e *imds.Error
	switch {
	case err == nil:
		c.Result, c.Detail = DiagOK, fmt.Sprintf("token and metadata in %s", took.Round(time.Millisecond))
	case errors.As(err, &e) && e.Token && e.Timeout:
		c.Result, c.Detail = DiagFail, "the token request (PUT /latest/api/token) times out: the hop-limit problem"
		c.Fix = "aws ec2 modify-instance-metadata-options --instance-id ID --http-put-response-hop-limit 2"
	default:
		c.Result, c.Detail = DiagFail, err.Error()
		c.Fix = "see the metadata options of the instance (http-endpoint, http-tokens)"
	}
	return c
}

func checkUserData(ctx context.Context, md *imds.Client, cfg config.Config) (Finding, config.Config) {
	c := Finding{Name: "user-data"}
	raw, err := md.UserData(ctx)
	if err != nil {
		c.Result, c.Detail = DiagFail, err.Error()
		return c, cfg
	}
	applied, info, err := config.ApplyUserData(cfg, raw)
	if err != nil {
		c.Result, c.Detail = DiagFail, err.Error()
		c.Fix = "check it with: bootagent userdata check FILE"
		return c, cfg
	}
	c.Result = DiagOK
	c.Detail = info.Format
	if len(info.Keys) > 0 {
		c.Detail += ", sets " + strings.Join(info.Keys, ", ")
	}
	return c, applied
}

// nobody is the uid the filter check connects as when the system names
// no user nobody.
const nobody = 65534

// outsider is a uid the rules do not let through: nobody's (as lookup
// finds it), unless imds.allow_users lets nobody in.
func outsider(r imdsfilter.Rules, lookup func(string) (uint32, error)) uint32 {
	uid := uint32(nobody)
	if n, err := lookup("nobody"); err == nil {
		uid = n
	}
	for slices.ContainsFunc(r.Users, func(u imdsfilter.User) bool { return u.UID == uid }) {
		uid--
	}
	return uid
}

// checkFilter checks the IMDS filter: that the kernel's table holds what
// imds.allow_users asks, and that it works, by connecting to the endpoint
// the agent uses as the agent's user (let through) and as nobody (refused
// at once).
func checkFilter(ctx context.Context, f *imdsfilter.Filter, cfg config.Config) Finding {
	c := Finding{Name: "IMDS filter"}
	if len(cfg.IMDS.AllowUsers) == 0 {
		c.Result, c.Detail = DiagSkip, "off (imds.allow_users is empty): every user of the instance can read the user-data and the role's credentials"
		c.Fix = "set imds.allow_users: [root] to keep IMDS for root"
		if cfg.Chef.ValidationCert != "" {
			c.Result, c.Detail = DiagWarn, "off, and the user-data holds the Chef validator key: every user of the instance can read it"
		}
		return c
	}
	c.Fix = "the agent installs it at start and puts it back within imds.poll_interval: systemctl restart bootagent; journalctl -u bootagent says why it could not"
	want, unknown := filterRules(cfg.IMDS, uint32(os.Geteuid()), lookupUser)
	have, err := f.Read()
	switch {
	case errors.Is(err, fs.ErrPermission):
		c.Result, c.Detail, c.Fix = DiagFail, "cannot read nftables: "+err.Error(), "run diagnose as root: reading nftables needs CAP_NET_ADMIN, connecting as another user CAP_SETUID"
		return c
	case err != nil:
		c.Result, c.Detail = DiagFail, err.Error()
		return c
	case have == nil:
		c.Result, c.Detail = DiagFail, "no table inet "+imdsfilter.Table+": IMDS is open to every user"
		return c
	case !have.Equal(want):
		c.Result, c.Detail = DiagFail, fmt.Sprintf("the table holds %s, the configuration asks for %s", have, want)
		return c
	}
	ep := imdsEndpoint(cfg.IMDS)
	self := uint32(os.Geteuid())
	if err := imdsfilter.DialAs(ctx, ep, self); err != nil {
		c.Result, c.Detail = DiagFail, fmt.Sprintf("%s; but uid %d, the agent's, cannot connect to %s: %v", have, self, ep, err)
		return c
	}
	other := outsider(*have, lookupUser)
	err = imdsfilter.DialAs(ctx, ep, other)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		what := "connects"
		if err != nil {
			what = "is not refused at once: " + err.Error()
		}
		c.Result, c.Detail = DiagFail, fmt.Sprintf("%s; but uid %d %s to %s", have, other, what, ep)
		c.Fix = "a NAT rule of another table may send IMDS's address elsewhere before this chain sees it, or the kernel lacks meta skuid: nft list ruleset"
		return c
	}
	c.Result = DiagOK
	c.Detail = fmt.Sprintf("%s; %s: uid %d connects, uid %d is refused", have, ep, self, other)
	if len(unknown) > 0 {
		c.Result = DiagWarn
		c.Detail += "; no such user (yet): " + strings.Join(unknown, ", ")
		c.Fix = "users are looked up in /etc/passwd at each poll; a user made later is let through once it exists"
	}
	return c
}

// imdsEndpoint is the endpoint the agent's IMDS requests go to.
func imdsEndpoint(c config.IMDS) netip.AddrPort {
	if ep, ok := c.EndpointAddr(); ok {
		return ep
	}
	if c.IPv6() {
		return imdsfilter.IPv6Endpoint
	}
	return imdsfilter.IPv4Endpoint
}

func checkResolution(root string, st State) Finding {
	c := Finding{Name: "hostname -f"}
	if filepath.Clean(root) != "/" {
		c.Result, c.Detail = DiagSkip, "--root: this machine's resolver does not read the root's /etc/hosts"
		return c
	}
	out, err := exec.Command("hostname", "-f").CombinedOutput()
	got := strings.TrimSpace(string(out))
	switch {
	case err != nil:
		c.Result, c.Detail = DiagFail, fmt.Sprintf("hostname -f: %v: %s", err, got)
		c.Fix = "keep hostname.manage_etc_hosts on, so that the name resolves through /etc/hosts"
	case st.Hostname != "" && got != st.Hostname:
		c.Result, c.Detail = DiagFail, fmt.Sprintf("answers %q, not the name applied (%s)", got, st.Hostname)
		c.Fix = "check the bootagent block in /etc/hosts, and anything else that sets the name"
	default:
		c.Result, c.Detail = DiagOK, got
	}
	return c
}

func checkChefServer(ctx context.Context, root string, cfg config.Config, st State) []Finding {
	server := Finding{Name: "Chef server"}
	clock := Finding{Name: "clock skew"}
	key := Finding{Name: "client key"}
	r := registrar(cfg, root, zap.NewNop(), backoff.RealClock{}, registerRetry)
	p, err := r.ProbeServer(ctx, st.NodeName, cfg.Chef.ClientKey)
	if err != nil {
		server.Result, server.Detail = DiagFail, fmt.Sprintf("%s: %v", cfg.Chef.ServerURL, err)
		server.Fix = "check chef.server_url, the network path to it, and chef.trusted_certs for its certificate"
		return []Finding{server}
	}
	server.Result, server.Detail = DiagOK, fmt.Sprintf("%s answers in %s", cfg.Chef.ServerURL, p.Latency.Round(time.Millisecond))
	skew := p.Skew.Abs()
	switch {
	case skew > chef.MaxClockSkew:
		clock.Result, clock.Detail = DiagFail, fmt.Sprintf("this clock is %s off the Chef server's; it refuses requests signed more than %s off", p.Skew, chef.MaxClockSkew)
		clock.Fix = "run time sync (chronyd or systemd-timesyncd, with the Amazon Time Sync Service)"
	case skew > time.Minute:
		clock.Result, clock.Detail = DiagWarn, fmt.Sprintf("%s off the Chef server's clock", p.Skew)
		clock.Fix = "run time sync (chronyd or systemd-timesyncd)"
	default:
		clock.Result, clock.Detail = DiagOK, fmt.Sprintf("%s off the Chef server's clock", p.Skew)
	}
	switch p.KeyStatus {
	case 0:
		key.Result, key.Detail = DiagSkip, "not registered yet: no key at "+cfg.Chef.ClientKey
	case http.StatusOK:
		key.Result, key.Detail = DiagOK, fmt.Sprintf("the server accepts %s for client %s", cfg.Chef.ClientKey, st.NodeName)
	default:
		key.Result, key.Detail = DiagFail, fmt.Sprintf("the server refuses %s for client %q (HTTP %d): revoked, deleted, or another key", cfg.Chef.ClientKey, st.NodeName, p.KeyStatus)
		key.Fix = "register again: systemctl stop bootagent; bootagent clean; put the validator back; systemctl start bootagent"
	}
	return []Finding{server, clock, key}
}

func checkChefClient(cfg config.Config) Finding {
	c := Finding{Name: "chef-client"}
	if !cfg.Chef.Exec {
		c.Result, c.Detail = DiagSkip, "chef.exec is false: bootagent runs no chef-client"
		return c
	}
	path, err := chef.LookCommand(cfg.Chef.ClientCommand)
	if err != nil {
		c.Result, c.Detail = DiagFail, err.Error()
		c.Fix = chef.NotInstalledFix
		return c
	}
	c.Result, c.Detail = DiagOK, path
	return c
}

// acceptedLicensesDir is where chef-client, run as root, looks for the
// markers of an accepted license (Chef's license-acceptance): one file per
// product, and Chef Infra Client's acceptance holds only with the marker of
// the product it carries (InSpec) beside its own.
const acceptedLicensesDir = "/etc/chef/accepted_licenses"

var licenseMarkers = []string{"chef_infra_client", "inspec"}

// licenseEnvironment is CHEF_LICENSE as chef-client's unit will have it:
// from systemd's own environment, which transient units inherit (not from
// diagnose's, nor the agent's unit's). Under another --root, or without
// systemd, it is "".
func licenseEnvironment(ctx context.Context, root string) string {
	if filepath.Clean(root) != "/" {
		return ""
	}
	env, err := chef.ManagerEnvironment(ctx)
	if err != nil {
		return ""
	}
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "CHEF_LICENSE="); ok {
			return v
		}
	}
	return ""
}

// commandLicense is the value of --chef-license on chef.client_command, ""
// when it has none.
func commandLicense(command []string) string {
	for i, arg := range command {
		if v, ok := strings.CutPrefix(arg, "--chef-license="); ok {
			return v
		}
		if arg == "--chef-license" && i+1 < len(command) {
			return command[i+1]
		}
	}
	return ""
}

// checkLicense says whether chef-client's license is accepted by any of
// what chef-client takes: --chef-license on chef.client_command,
// CHEF_LICENSE in systemd's environment (env), both compared without case
// as license-acceptance does, chef.license (client.rb's chef_license), or
// the markers chef-client left when it was accepted on the image. Cinc has
// no license to accept, and with chef.exec false bootagent runs no
// chef-client.
func checkLicense(root string, cfg config.Config, env string) Finding {
	c := Finding{Name: "chef-client license"}
	var missing []string
	for _, m := range licenseMarkers {
		// Any file that exists counts, as license-acceptance's File.exist?.
		if _, err := atomicfile.Stat(root, filepath.Join(acceptedLicensesDir, m)); err != nil {
			missing = append(missing, filepath.Join(acceptedLicensesDir, m))
		}
	}
	flag := commandLicense(cfg.Chef.ClientCommand)
	accepts := func(v string) bool { return slices.Contains(config.ChefLicenses, strings.ToLower(v)) }
	switch {
	case !cfg.Chef.Exec:
		c.Result, c.Detail = DiagSkip, "chef.exec is false: bootagent runs no chef-client"
	case cfg.Chef.Cinc():
		c.Result, c.Detail = DiagSkip, "Cinc has no license to accept"
	case accepts(flag):
		c.Result, c.Detail = DiagOK, fmt.Sprintf("--chef-license %s on chef.client_command", flag)
	case accepts(env):
		c.Result, c.Detail = DiagOK, fmt.Sprintf("CHEF_LICENSE=%s in systemd's environment, which chef-client's unit inherits", env)
	case cfg.Chef.License != "":
		c.Result, c.Detail = DiagOK, fmt.Sprintf("chef.license: %s (client.rb's chef_license)", cfg.Chef.License)
	case len(missing) == 0:
		c.Result, c.Detail = DiagOK, fmt.Sprintf("accepted on the image (%s and %s)", filepath.Join(acceptedLicensesDir, licenseMarkers[0]), licenseMarkers[1])
	default:
		c.Result, c.Detail = DiagWarn, "not accepted: chef-client 15 and later refuse to run (exit 172, license_not_accepted)"
		if flag != "" {
			c.Detail += fmt.Sprintf("; --chef-license %s on chef.client_command accepts nothing", flag)
		}
		if env != "" {
			c.Detail += fmt.Sprintf("; CHEF_LICENSE=%s in systemd's environment accepts nothing", env)
		}
		if len(missing) < len(licenseMarkers) {
			c.Detail += "; " + strings.Join(missing, " and ") + " is missing"
		}
		c.Fix = chef.ResultLicenseNotAccepted.Fix()
	}
	return c
}

func checkUnits(root string) Finding {
	c := Finding{Name: "units"}
	if filepath.Clean(root) != "/" {
		c.Result, c.Detail = DiagSkip, "--root: the units of the root are not this machine's"
		return c
	}
	out, err := exec.Command("systemctl", "is-enabled", "bootagent.service", "bootagent.path").CombinedOutput()
	if err != nil {
		c.Result, c.Detail = DiagFail, "not enabled: "+strings.Join(strings.Fields(string(out)), ", ")
		c.Fix = "systemctl enable bootagent.service bootagent.path"
		return c
	}
	c.Result, c.Detail = DiagOK, "bootagent.service and bootagent.path enabled"
	return c
}
