package agent

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
)

// Check is what `bootagent userdata check` reports: what a user-data would
// change, decided without asking IMDS.
type Check struct {
	UserData config.UserData `json:"user_data"`
	Hostname CheckedHostname `json:"hostname"`
	Chef     config.Chef     `json:"chef"`
	// Sources maps each setting the user-data or the file changed to where.
	Sources map[string]string `json:"sources"`
}

// CheckedHostname is the naming part of a Check.
type CheckedHostname struct {
	// Decided says how the name is chosen when the user-data does not
	// give it: at boot from a tag or IMDS, or left alone.
	Decided        string `json:"decided"`
	FQDN           string `json:"fqdn,omitempty"`
	Short          string `json:"short,omitempty"`
	Kernel         string `json:"kernel,omitempty"`
	HostsEntry     string `json:"hosts_entry,omitempty"`
	PreferFQDN     bool   `json:"prefer_fqdn"`
	ManageEtcHosts bool   `json:"manage_etc_hosts"`
}

// checkGathered stands in for what a boot reads from IMDS and the host
// when user-data is checked away from an instance: node name templates get
// something to expand.
var checkGathered = gathered{
	identity: imds.Identity{InstanceID: "i-0123456789abcdef0", Region: "eu-west-1"},
	current:  "ip-10-0-7-10.eu-west-1.compute.internal",
}

// CheckUserData decodes data over the baked configuration base and reports
// the settings it would apply, or the error that would stop the agent:
// the host name and every Chef setting are validated, and client.rb and
// first-boot.json rendered, as at boot.
func CheckUserData(base config.Config, data []byte) (Check, error) {
	cfg, info, err := config.ApplyUserData(base, data)
	if err != nil {
		return Check{}, err
	}
	h := cfg.Hostname
	c := Check{
		UserData: info,
		Chef:     cfg.Chef,
		Sources:  cfg.Sources(),
		Hostname: CheckedHostname{PreferFQDN: h.PreferFQDN, ManageEtcHosts: h.ManageEtcHosts},
	}
	p, err := decide(cfg, info, checkGathered, "/")
	if err != nil {
		return Check{}, err
	}
	switch n := p.name; {
	case h.Preserve:
		c.Hostname.Decided = "left alone (preserve_hostname)"
	case !n.IsZero():
		c.Hostname.Decided = "from " + cfg.Source("hostname.name")
		c.Hostname.FQDN, c.Hostname.Short = n.FQDN, n.Short
		c.Hostname.Kernel = n.Kernel(h.PreferFQDN)
		if h.ManageEtcHosts {
			c.Hostname.HostsEntry = n.HostsEntry()
		}
	default:
		var steps []string
		if h.FromTag != "" {
			steps = append(steps, "instance tag "+h.FromTag)
		}
		if h.Fallback == config.FallbackIMDS {
			steps = append(steps, "IMDS local-hostname")
		}
		if len(steps) == 0 {
			c.Hostname.Decided = "left alone (no name given and hostname.fallback is keep)"
		} else {
			c.Hostname.Decided = "at boot, from " + strings.Join(steps, ", else ")
		}
	}
	return c, nil
}

// WriteText prints the check for people.
func (c Check) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s\t%s\n", k, v)
		}
	}
	row("user-data", c.UserData.Format)
	row("hostname", c.Hostname.Decided)
	row("  fqdn", c.Hostname.FQDN)
	row("  short name", c.Hostname.Short)
	row("  kernel name", c.Hostname.Kernel)
	row("  /etc/hosts", strings.ReplaceAll(c.Hostname.HostsEntry, "\t", " "))
	row("  prefer_fqdn", fmt.Sprint(c.Hostname.PreferFQDN))
	row("  manage_etc_hosts", fmt.Sprint(c.Hostname.ManageEtcHosts))
	if c.Chef.Enabled() {
		row("chef server", c.Chef.ServerURL)
		row("  node name", c.Chef.NodeName)
		row("  environment", c.Chef.Environment)
		row("  run list", strings.Join(c.Chef.RunList, ", "))
		if c.Chef.PolicyName != "" {
			row("  policy", c.Chef.PolicyName+" in "+c.Chef.PolicyGroup)
		}
		if c.Chef.ValidationCert != "" {
			row("  validation key", "given in user-data (not shown)")
		}
	} else {
		row("chef", "off (no chef.server_url)")
	}
	for _, k := range c.UserData.Keys {
		row("set "+k, c.Sources[k])
	}
	for _, why := range c.UserData.Ignored {
		row("left alone", why)
	}
	return tw.Flush()
}

// WriteText prints the result of a pass for people.
func (r Result) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "instance\t%s (%s)\n", r.Identity.InstanceID, r.Identity.AvailabilityZone)
	fmt.Fprintf(tw, "user-data\t%s\n", r.UserData.Format)
	if r.Hostname.IsZero() {
		fmt.Fprintf(tw, "hostname\tleft alone (%s)\n", r.HostnameSource)
	} else {
		fmt.Fprintf(tw, "hostname\t%s (from %s)\n", r.Hostname, r.HostnameSource)
	}
	for _, c := range r.Changes {
		fmt.Fprintf(tw, "  changed %s\t%q -> %q\n", c.What, c.Old, c.New)
	}
	switch {
	case r.NodeName != "" && r.Terminating != "":
		fmt.Fprintf(tw, "chef node\t%s not registered: the instance is terminating (%s)\n", r.NodeName, r.Terminating)
	case r.NodeName != "" && r.Warmed != "":
		fmt.Fprintf(tw, "chef node\t%s not registered yet: the instance is in a warm pool (%s)\n", r.NodeName, r.Warmed)
	case r.NodeName != "":
		fmt.Fprintf(tw, "chef node\t%s (client created: %t, node created: %t)\n", r.NodeName, r.Registered.ClientCreated, r.Registered.NodeCreated)
	}
	if f := r.FirstRun; f != nil {
		fmt.Fprintf(tw, "chef-client run\t%s: %s, exit code %d, took %s\n", f.ID, f.Result, f.ExitCode, f.Duration.Round(time.Millisecond))
	}
	for _, s := range r.Steps {
		fmt.Fprintf(tw, "step %s\t+%s, took %s\n", s.Name, s.Offset.Round(time.Microsecond), s.Duration.Round(time.Microsecond))
	}
	return tw.Flush()
}
