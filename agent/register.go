package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/internal/fault"
)

// Where chef-client's files live (under the agent's root).
const (
	clientRBPath = "/etc/chef/client.rb"
	// ec2HintPath tells Ohai's ec2 plugin that this is an EC2 instance,
	// which it cannot always tell from the hardware (as knife-ec2 does).
	// Ohai's hints_path is /etc/chef/ohai/hints, written out in its
	// source; Cinc's rebranded build may read /etc/cinc instead
	// (cincHintPath), so for Cinc both are written. The iam
	// hint is never written: it makes Ohai copy the instance role's data
	// into the node's attributes, for the Chef server and everyone who can
	// read nodes to see.
	ec2HintPath  = "/etc/chef/ohai/hints/ec2.json"
	cincHintPath = "/etc/cinc/ohai/hints/ec2.json"
)

// registerRetry paces retries of Chef server requests during registration:
// a fleet scaling out together spreads its retries, and a server that is
// down for a few minutes is waited for. The cap is short because in a
// storm it is the wait of the unluckiest instance past the moment the
// server could have taken it (`make bench-fleet`: a one-minute cap made the
// last of 500 instances register twice as late as it could have); a
// throttling server's Retry-After still holds it off for longer.
var registerRetry = backoff.Policy{Initial: time.Second, Max: 20 * time.Second, Jitter: 0.5}

// clientRBKeys maps client.rb settings to the config keys they come from.
var clientRBKeys = map[string]string{
	"chef_server_url":           "chef.server_url",
	"client_key":                "chef.client_key",
	"ssl_ca_file":               "chef.trusted_certs",
	"environment":               "chef.environment",
	"policy_name":               "chef.policy_name",
	"policy_group":              "chef.policy_group",
	"chef_license":              "chef.license",
	"log_level":                 "chef.log_level",
	"file_cache_path":           "chef.file_cache_path",
	"file_backup_path":          "chef.file_backup_path",
	"pid_file":                  "chef.pid_file",
	"json_attribs":              "chef.json_attribs",
	"encrypted_data_bag_secret": "chef.encrypted_data_bag_secret",
	"http_proxy":                "chef.http_proxy",
	"https_proxy":               "chef.https_proxy",
	"no_proxy":                  "chef.no_proxy",
}

// chefPlan is everything the Chef steps will do, decided and validated
// before anything is written.
type chefPlan struct {
	nodeName  string
	node      chef.Node
	clientRB  []byte
	firstBoot []byte
	// validator is the validator key given in user-data, normalised; nil
	// when it is read from chef.validation_key.
	validator []byte
	// key is the key pair made ahead for this registration, or nil: it is
	// made when the registration needs it.
	key *keyAhead
}

// planChef validates the Chef settings and renders chef-client's files, so
// that a value that cannot be represented is refused before anything at all
// is written. host is the host's name (the one applied, or the one it has
// when the name is left alone), which node name templates may use; root is
// where the paths written into client.rb are taken.
func planChef(cfg config.Config, id imds.Identity, host, root string) (*chefPlan, error) {
	ch := cfg.Chef
	if !ch.Enabled() {
		return nil, nil
	}
	bad := func(key string, err error) error {
		return &config.InvalidError{Source: cfg.Source(key), Reason: err.Error()}
	}
	vars := chef.NameVars{FQDN: host, InstanceID: id.InstanceID, Region: id.Region}
	vars.Hostname, _, _ = strings.Cut(host, ".")
	under := func(p string) string { return filepath.Join(root, p) }
	p := &chefPlan{}
	var err error
	if p.nodeName, err = chef.ExpandNodeName(ch.NodeName, vars); err != nil {
		return nil, bad("chef.node_name", err)
	}
	if ch.Environment != "" {
		if err := chef.ValidateEnvironment(ch.Environment); err != nil {
			return nil, bad("chef.environment", err)
		}
	}
	if ch.PolicyName != "" {
		if err := chef.ValidatePolicy("policy_name", ch.PolicyName); err != nil {
			return nil, bad("chef.policy_name", err)
		}
		if err := chef.ValidatePolicy("policy_group", ch.PolicyGroup); err != nil {
			return nil, bad("chef.policy_group", err)
		}
	}
	runList, err := chef.NormalizeRunList(ch.RunList)
	if err != nil {
		return nil, bad("chef.run_list", err)
	}
	p.node = chef.Node{Environment: ch.Environment, RunList: runList, PolicyName: ch.PolicyName, PolicyGroup: ch.PolicyGroup, Attributes: ch.InitialAttributes}
	if p.firstBoot, err = chef.RenderFirstBoot(chef.FirstBoot{RunList: runList, PolicyName: ch.PolicyName, PolicyGroup: ch.PolicyGroup, Attributes: ch.InitialAttributes}); err != nil {
		return nil, bad("chef.initial_attributes", err)
	}
	rb := chef.ClientConfig{
		ServerURL:    ch.ServerURL,
		NodeName:     p.nodeName,
		ClientKey:    under(ch.ClientKey),
		SSLVerify:    ch.SSLVerify,
		AuthProtocol: ch.AuthProtocol,
		Environment:  ch.Environment,
		PolicyName:   ch.PolicyName,
		PolicyGroup:  ch.PolicyGroup,
		License:      ch.License,
		LogLevel:     ch.LogLevel,
		// chef-client's own directories and pid file are taken as given:
		// they are its, not files the agent manages.
		FileCachePath:  ch.FileCachePath,
		FileBackupPath: ch.FileBackupPath,
		PIDFile:        ch.PIDFile,
		ShowTime:       ch.ShowTime,
		Proxies:        proxies(ch),
	}
	if ch.EncryptedDataBagSecret != "" {
		rb.EncryptedDataBagSecret = under(ch.EncryptedDataBagSecret)
	}
	if ch.TrustedCerts != "" {
		rb.CAFile = under(ch.TrustedCerts)
	}
	if ch.JSONAttribs != "" {
		rb.JSONAttribs = under(ch.JSONAttribs)
	}
	if p.clientRB, err = chef.RenderClientRB(rb); err != nil {
		key := "chef.server_url"
		var se *chef.SettingError
		if errors.As(err, &se) {
			key = clientRBKeys[se.Setting]
		}
		return nil, bad(key, err)
	}
	if ch.ValidationCert != "" {
		if p.validator, err = chef.NormalizeKeyPEM(ch.ValidationCert); err != nil {
			return nil, bad("chef.validation_cert", err)
		}
	}
	return p, nil
}

// hintPaths are where the Ohai of chef.client_command may read the EC2
// hint.
func hintPaths(ch config.Chef) []string {
	if ch.Cinc() {
		return []string{ec2HintPath, cincHintPath}
	}
	return []string{ec2HintPath}
}

// registrar talks to the Chef server cfg names, for the agent under root.
func registrar(cfg config.Config, root string, log *zap.Logger, clock backoff.Clock, policy backoff.Policy) *chef.Registrar {
	ch := cfg.Chef
	server := chef.ServerOptions{URL: ch.ServerURL, AuthProtocol: ch.AuthProtocol, SSLVerify: ch.SSLVerify, CAFile: ch.TrustedCerts, Proxies: proxies(ch), Root: root}
	return &chef.Registrar{Server: server, Log: log, Backoff: policy, Budget: ch.RequestBudget.D(), Clock: clock}
}

// proxies are the proxies to the Chef server cfg names, for chef-client
// and the agent alike.
func proxies(ch config.Chef) chef.Proxies {
	return chef.Proxies{HTTP: ch.HTTPProxy, HTTPS: ch.HTTPSProxy, No: ch.NoProxy}
}

// writeFile writes the file name under the root, and says so when it could
// not be replaced atomically.
func (e *Engine) writeFile(log *zap.Logger, name string, data []byte, perm fs.FileMode) error {
	inPlace, err := atomicfile.WriteFile(e.root, name, data, perm)
	if inPlace {
		log.Warn(name+" is a mount point; rewritten in place, not atomically", zap.String("path", e.path(name)))
	}
	return err
}

// register is the registration worker: it makes the instance a node and
// writes chef-client's files. The validator key is deleted only once
// everything it was needed for is done. When stop is closed, it ends
// before its next request to the Chef server.
func (e *Engine) register(ctx context.Context, log *zap.Logger, cfg config.Config, p *chefPlan, stop <-chan struct{}) (chef.Registered, error) {
	ch := cfg.Chef
	log = log.With(zap.String("node_name", p.nodeName))
	if !ch.SSLVerify {
		log.Warn("chef.ssl_verify is false: the Chef server's certificate is not checked, so anyone on the path can impersonate it")
	}
	if p.validator != nil {
		if err := e.writeFile(log, ch.ValidationKey, p.validator, 0o600); err != nil {
			return chef.Registered{}, fmt.Errorf("write the validator key from user-data: %w", err)
		}
	}
	validator, err := atomicfile.ReadFile(e.root, ch.ValidationKey)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return chef.Registered{}, fmt.Errorf("read the validator key: %w", err)
	}
	r := registrar(cfg, e.root, log, e.clock, e.retryPolicy(registerRetry))
	r.Stop = stop
	r.Observe = observeChef(e.m)
	if p.key != nil {
		r.NewKey = p.key.take
	}
	reg, err := r.Register(ctx, chef.Registration{
		NodeName:      p.nodeName,
		ClientKeyPath: ch.ClientKey,
		ValidatorName: ch.ValidationClientName,
		ValidatorKey:  validator,
		ValidatorPath: ch.ValidationKey,
		Node:          p.node,
	})
	if err != nil {
		return reg, err
	}
	type file struct {
		path string
		data []byte
		mode fs.FileMode
	}
	files := []file{
		{clientRBPath, p.clientRB, 0o644},
		// The first run's attributes may be secrets of the application.
		{ch.FirstBootPath, p.firstBoot, 0o600},
	}
	for _, hint := range hintPaths(ch) {
		files = append(files, file{hint, []byte("{}\n"), 0o644})
	}
	for _, f := range files {
		if err := e.writeFile(log, f.path, f.data, f.mode); err != nil {
			return reg, err
		}
	}
	fault.Point("files-written")
	log.Info("registered with the Chef server", zap.String("server", ch.ServerURL),
		zap.Bool("client_created", reg.ClientCreated), zap.Bool("node_created", reg.NodeCreated), zap.Bool("key_reused", reg.KeyReused))
	if ch.DeleteValidationKey {
		switch err := atomicfile.Remove(e.root, ch.ValidationKey); {
		case err == nil:
			log.Info("validator key deleted: this instance no longer needs it", zap.String("path", ch.ValidationKey))
			fault.Point("validator-deleted")
		case !errors.Is(err, fs.ErrNotExist):
			return reg, fmt.Errorf("delete the validator key: %w", err)
		}
	}
	return reg, nil
}
