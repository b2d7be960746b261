package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/atomicfile"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/hostname"
	"github.com/bootagent/bootagent/imds"
)

// plan is everything a bootstrap decided, before anything is changed: the
// effective configuration, the name, and what the Chef steps will do.
type plan struct {
	// cfg is the baked configuration with the user-data over it.
	cfg  config.Config
	info config.UserData
	// name is the host name to apply; zero when the name is left alone.
	name   hostname.Name
	source string
	// chef is nil when Chef is not configured.
	chef *chefPlan
}

// gathered is what a bootstrap reads before it decides anything.
type gathered struct {
	identity imds.Identity
	// tag is the value of hostname.from_tag, when the name comes to it
	// and the instance has the tag.
	tag string
	// local is IMDS's local-hostname, when the name comes to it.
	local string
	// current is the host's name now, which names the node when the name
	// is left alone.
	current string
}

// booted is what a bootstrap found and did, reported to the owner of the
// state.
type booted struct {
	identity imds.Identity
	plan     *plan
	changes  []hostname.Change
	// started is when the bootstrap began; steps are timed from it.
	started time.Time
	steps   []Step
	// lifecycle is the Auto Scaling target lifecycle state, read after
	// the name is applied when Chef is configured (a warm-pool instance
	// waits to register); lifecycleErr says why it could not be read.
	lifecycle    string
	lifecycleErr error
	// keyPresent is true when the node's key is on disk.
	keyPresent bool
}

// bootstrap is the bootstrap worker: it waits for IMDS, reads the identity
// and the user-data, decides the name and the Chef plan with pure functions
// of what it read, and applies the name. previous is the instance the
// state names: when IMDS says another, the files the previous one left
// are removed first. tell is told of the identity once IMDS answers, and
// of the name just before it is applied. Everything is decided and
// validated before the first change is made.
func (e *Engine) bootstrap(ctx context.Context, md Metadata, base config.Config, previous string, tell func(event)) (booted, error) {
	timer := newStepTimer(e.clock)
	b := booted{started: timer.start}
	// The IMDS filter goes in while IMDS is waited for, and is in place
	// before the user-data, which may hold secrets, is read.
	filtered := make(chan filterKept, 1)
	if len(base.IMDS.AllowUsers) > 0 {
		go func() { filtered <- e.filter.keep(base.IMDS) }()
	} else {
		filtered <- filterKept{}
	}
	// Logged once the check is done, by the bootstrap's logger of the
	// moment (it names the instance once IMDS has answered).
	flog := e.log
	waitFiltered := sync.OnceFunc(func() {
		if kept := <-filtered; kept.on {
			e.filter.report(flog, kept)
		}
	})
	defer waitFiltered()
	// A first boot will register: its key pair is made while IMDS is read.
	var key *keyAhead
	if base.Chef.Enabled() {
		if _, err := atomicfile.Stat(e.root, base.Chef.ClientKey); errors.Is(err, fs.ErrNotExist) {
			key = e.keyAhead()
		}
	}
	id, waited, err := md.Wait(ctx, base.IMDS.WaitTimeout.D())
	if err != nil {
		return b, err
	}
	b.identity = id
	tell(evIdentified{identity: id})
	log := e.log.With(zap.String("instance_id", id.InstanceID))
	flog = log
	detail := ""
	if waited.Attempts > 1 {
		detail = fmt.Sprintf("IMDS answered at attempt %d after: %s", waited.Attempts, strings.Join(waited.Reasons, ", "))
	}
	log.Info("instance identified", zap.String("region", id.Region), zap.String("availability_zone", id.AvailabilityZone),
		zap.Duration("waited", timer.done("imds", detail).Duration))
	if previous != "" && previous != id.InstanceID {
		log.Warn("a new instance: the state was left by another one (an image baked without `bootagent clean`?); its registration is dropped and first-boot work runs again",
			zap.String("previous_instance_id", previous))
		if err := e.forgetInstance(base); err != nil {
			return b, err
		}
		if key == nil && base.Chef.Enabled() {
			key = e.keyAhead()
		}
	}

	waitFiltered()
	raw, err := md.UserData(ctx)
	if tl := new(*imds.TooLargeError); errors.As(err, tl) {
		// No retry makes it smaller: it is bad input, as a file of that
		// size given to `userdata check` is.
		if !(*tl).AtLeast {
			return b, config.OversizedUserData((*tl).Size)
		}
		return b, &config.InvalidError{Source: "user-data", Reason: (*tl).Error()}
	}
	if err != nil {
		return b, fmt.Errorf("read user-data: %w", err)
	}
	cfg, info, err := config.ApplyUserData(base, raw)
	if err != nil {
		return b, err
	}
	log.Info("user-data read", zap.String("format", info.Format), zap.Strings("keys", info.Keys), zap.Int("bytes", len(raw)))
	// A list user-data gives is in place before anything else is done
	// with it; one it empties goes after the name.
	if len(cfg.IMDS.AllowUsers) > 0 {
		e.filter.report(log, e.filter.keep(cfg.IMDS))
	}
	if cfg.Chef.ValidationCert != "" || info.PrivateKey {
		e.validatorWarning.Do(func() { warnKeyInUserData(log, cfg.IMDS, cfg.Chef.ValidationCert != "") })
	}
	for _, why := range info.Ignored {
		log.Info("user-data left alone", zap.String("why", why))
	}
	log.Debug("effective configuration", zap.Any("config", redacted(cfg)))
	timer.done("user-data", "")

	g, err := e.gatherNames(ctx, log, md, cfg)
	if err != nil {
		return b, err
	}
	g.identity = id
	p, err := decide(cfg, info, g, e.root)
	if err != nil {
		return b, err
	}
	b.plan = p
	if p.chef != nil {
		p.chef.key = key
	}

	switch {
	case cfg.Hostname.Preserve:
		log.Info("hostname preserved, as asked (preserve_hostname)")
	case p.name.IsZero():
		log.Info("hostname left alone: no name in user-data and hostname.fallback is keep")
	default:
		tell(evNaming{name: p.name})
		if b.changes, err = e.applyName(ctx, log, cfg, p.name); err != nil {
			return b, err
		}
		log.Info("hostname applied", zap.Stringer("hostname", p.name), zap.String("from", p.source),
			zap.Int("changes", len(b.changes)), zap.Duration("since_start", e.clock.Now().Sub(timer.start)))
	}
	timer.done("hostname", "")
	if len(cfg.IMDS.AllowUsers) == 0 {
		// A table an earlier configuration asked for goes, off the
		// name's path.
		e.filter.report(log, e.filter.keep(cfg.IMDS))
	}
	b.steps = timer.steps

	if p.chef != nil {
		b.lifecycle, b.lifecycleErr = md.LifecycleState(ctx)
		_, err := atomicfile.Stat(e.root, cfg.Chef.ClientKey)
		b.keyPresent = err == nil
	}
	return b, nil
}

// warnKeyInUserData says, once per process, that a private key in
// user-data (the Chef validator's when validator is true, else one in a
// part left to cloud-init) outlives any file made from it: IMDS serves
// user-data for the instance's whole life. It names the key, never its
// contents.
func warnKeyInUserData(log *zap.Logger, c config.IMDS, validator bool) {
	what := "user-data holds a private key (a write_files entry or a script?)"
	if validator {
		what = "user-data carries the Chef validator key (validation_cert)"
	}
	if len(c.AllowUsers) > 0 {
		log.Warn(what+": IMDS serves it for the instance's whole life, to the users of imds.allow_users; "+
			"keep it out of user-data to close that too: bake it into the image (chef.validation_key) or deliver it out of band",
			zap.Strings("allow_users", c.AllowUsers))
		return
	}
	log.Warn(what + ": IMDS serves it to every user and process of the instance for the instance's whole life, " +
		"though bootagent deletes its own copy after registering; limit IMDS to root with imds.allow_users, " +
		"or keep the key out of user-data: bake it into the image (chef.validation_key) or deliver it out of band")
}

// keyAhead is the instance's key pair, made in the background from when a
// bootstrap sees that it will register (about 46 ms of CPU for 2048 bits),
// so that the registration does not wait for it.
type keyAhead struct {
	done chan struct{}
	pem  []byte
	err  error
}

// keyAhead starts making the key pair, once for the Engine: a bootstrap
// tried again takes the same one rather than making another.
func (e *Engine) keyAhead() *keyAhead {
	e.keyOnce.Do(func() {
		k := &keyAhead{done: make(chan struct{})}
		go func() {
			defer close(k.done)
			k.pem, k.err = chef.GenerateKey()
		}()
		e.key = k
	})
	return e.key
}

// take waits for the key; it is chef.Registrar's NewKey.
func (k *keyAhead) take() ([]byte, error) {
	<-k.done
	return k.pem, k.err
}

// forgetInstance removes what ties the machine to an instance (see
// instanceFiles).
func (e *Engine) forgetInstance(cfg config.Config) error {
	for _, p := range instanceFiles(cfg) {
		if err := atomicfile.Remove(e.root, p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("forget the previous instance: %w", err)
		}
	}
	return nil
}

// gatherNames reads what the name may come from, when the configuration
// does not give it: the instance tag named by hostname.from_tag, IMDS
// local-hostname, or the host's own name when the name is left alone.
func (e *Engine) gatherNames(ctx context.Context, log *zap.Logger, md Metadata, cfg config.Config) (gathered, error) {
	var g gathered
	h := cfg.Hostname
	if h.Name != "" && !h.Preserve {
		return g, nil
	}
	if !h.Preserve && h.FromTag != "" {
		v, err := md.Tag(ctx, h.FromTag)
		switch {
		case err == nil:
			g.tag = v
			return g, nil
		case errors.Is(err, imds.ErrNotFound):
			log.Info("no name from the instance tag", zap.String("tag", h.FromTag), zap.Error(err))
		default:
			return g, fmt.Errorf("read instance tag %s: %w", h.FromTag, err)
		}
	}
	if !h.Preserve && h.Fallback == config.FallbackIMDS {
		local, err := md.LocalHostname(ctx)
		if err != nil {
			return g, fmt.Errorf("read local-hostname: %w", err)
		}
		g.local = local
		return g, nil
	}
	if cfg.Chef.Enabled() {
		current, err := e.hostname()
		if err != nil {
			return g, fmt.Errorf("read the host name: %w", err)
		}
		g.current = current
	}
	return g, nil
}

// decide makes the plan from the configuration and what was gathered: the
// name (the configuration, else the tag, else IMDS local-hostname, else
// none), and the Chef plan. It is a pure function, so that `userdata check`
// decides exactly as a boot does.
func decide(cfg config.Config, info config.UserData, g gathered, root string) (*plan, error) {
	p := &plan{cfg: cfg, info: info}
	h := cfg.Hostname
	n, err := configuredName(cfg)
	switch {
	case h.Preserve:
		p.source = cfg.Source("hostname.preserve")
	case err != nil:
		return nil, err
	case !n.IsZero():
		p.name, p.source = n, cfg.Source("hostname.name")
	case g.tag != "":
		if p.name, err = hostname.Make(g.tag, h.Domain); err != nil {
			return nil, &config.InvalidError{Source: "instance tag " + h.FromTag, Reason: err.Error() + "; fix the tag, or set hostname in user-data"}
		}
		p.source = "instance tag " + h.FromTag
	case g.local != "":
		local := g.local
		if h.Domain != "" {
			// A baked domain replaces the EC2 one: ip-10-0-7-10.example.internal.
			local, _, _ = strings.Cut(local, ".")
		}
		if p.name, err = hostname.Make(local, h.Domain); err != nil {
			return nil, fmt.Errorf("IMDS local-hostname: %w", err)
		}
		p.source = "IMDS local-hostname"
	default:
		p.source = "hostname.fallback keep"
	}
	current := g.current
	if !p.name.IsZero() {
		current = p.name.String()
	}
	if p.chef, err = planChef(cfg, g.identity, current, root); err != nil {
		return nil, err
	}
	return p, nil
}

// applyName sets the name and logs each change.
func (e *Engine) applyName(ctx context.Context, log *zap.Logger, cfg config.Config, name hostname.Name) ([]hostname.Change, error) {
	if wrote, err := e.namer.TameCloudInit(); err != nil {
		return nil, fmt.Errorf("keep cloud-init off the hostname: %w", err)
	} else if wrote {
		log.Info("told cloud-init to leave the hostname alone", zap.String("file", "/etc/cloud/cloud.cfg.d/99-bootagent.cfg"))
	}
	changes, err := e.namer.Apply(ctx, name, policy(cfg))
	for _, c := range changes {
		log.Info("hostname set", zap.String("what", c.What), zap.String("old", c.Old), zap.String("new", c.New))
	}
	if err != nil {
		return changes, fmt.Errorf("apply hostname %s: %w", name, err)
	}
	return changes, nil
}

func policy(cfg config.Config) hostname.Policy {
	return hostname.Policy{PreferFQDN: cfg.Hostname.PreferFQDN, ManageEtcHosts: cfg.Hostname.ManageEtcHosts}
}

// configuredName validates the name the configuration gives (from
// user-data or the file); zero when it gives none.
func configuredName(cfg config.Config) (hostname.Name, error) {
	h := cfg.Hostname
	if h.Domain != "" {
		if err := hostname.Validate(h.Domain); err != nil {
			return hostname.Name{}, &config.InvalidError{Source: cfg.Source("hostname.domain"), Reason: "domain " + err.Error()}
		}
	}
	if h.Name == "" {
		return hostname.Name{}, nil
	}
	n, err := hostname.Make(h.Name, h.Domain)
	if err != nil {
		return hostname.Name{}, &config.InvalidError{Source: cfg.Source("hostname.name"), Reason: err.Error()}
	}
	return n, nil
}

// needsHuman reports whether a failure waits for someone to fix something
// (bad input, a name collision, a refused validator) rather than for time
// to pass.
func needsHuman(err error) bool {
	return errors.Is(err, config.ErrInvalid) || errors.Is(err, chef.ErrInvalid) ||
		errors.Is(err, chef.ErrNameTaken) || errors.Is(err, chef.ErrValidatorRefused)
}

// redacted is cfg as it may be logged: the initial attributes can carry
// secrets (passwords, tokens for a cookbook), so only their top-level keys
// are shown. The validator key is never marshalled at all.
func redacted(cfg config.Config) config.Config {
	if len(cfg.Chef.InitialAttributes) == 0 {
		return cfg
	}
	shown := make(config.Object, len(cfg.Chef.InitialAttributes))
	for k := range cfg.Chef.InitialAttributes {
		shown[k] = "(redacted)"
	}
	cfg.Chef.InitialAttributes = shown
	return cfg
}
