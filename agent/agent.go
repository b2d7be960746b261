// Package agent orchestrates the bootstrap of an instance: wait for IMDS,
// read the identity and user-data, decide and apply the host name, register
// with the Chef server, then keep the instance converged and named. It keeps
// per-instance state, so that a later boot of the same instance does only
// what is left, and a new instance launched from the image starts afresh.
package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/hostname"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/internal/fault"
	"github.com/bootagent/bootagent/metrics"
	"github.com/bootagent/bootagent/systemd"
)

// Metadata is what the agent reads from the instance metadata service.
type Metadata interface {
	Wait(ctx context.Context, timeout time.Duration) (imds.Identity, imds.WaitStats, error)
	UserData(ctx context.Context) ([]byte, error)
	LocalHostname(ctx context.Context) (string, error)
	Tag(ctx context.Context, key string) (string, error)
	LifecycleState(ctx context.Context) (string, error)
	Notices(ctx context.Context) (imds.Notices, error)
}

// Namer applies host names to the system.
type Namer interface {
	Apply(ctx context.Context, n hostname.Name, p hostname.Policy) ([]hostname.Change, error)
	TameCloudInit() (bool, error)
}

// Options are the Engine's dependencies.
type Options struct {
	// Config is the baked configuration (file over defaults); user-data is
	// applied over it at each pass.
	Config config.Config
	// Root prefixes every path the agent writes.
	Root string
	Log  *zap.Logger
	// Clock paces retries; nil is the wall clock.
	Clock backoff.Clock
	// Metadata reads IMDS; nil builds a client from Config.
	Metadata Metadata
	// Namer applies host names; nil builds a hostname.Manager for Root.
	Namer Namer
	// Runner runs chef-client; nil picks a transient systemd unit when
	// systemd runs the agent on the real root, a child process otherwise.
	Runner chef.Runner
	// Notifier tells systemd the agent's state; nil speaks sd_notify (a
	// no-op when not started by systemd).
	Notifier Notifier
	// Metrics collects the agent's metrics; nil makes a set.
	Metrics *metrics.Metrics
	// Version is the agent's, for the bootagent_info metric.
	Version string
	// Backoff, when set, replaces every retry policy of the agent (Chef
	// server requests at registration, bootstrap passes, failed
	// chef-client runs). The fleet benchmark sets a fixed delay without
	// jitter to show what the policies are worth.
	Backoff *backoff.Policy
}

// Notifier tells the service manager how the agent is doing.
type Notifier interface {
	Ready(status string)
	Status(status string)
	Stopping()
	Watchdog()
}

// Engine runs bootstrap passes and the watch loop.
type Engine struct {
	cfg      config.Config
	root     string
	log      *zap.Logger
	clock    backoff.Clock
	md       Metadata
	ownMD    bool
	namer    Namer
	runner   chef.Runner
	notifier Notifier
	m        *metrics.Metrics
	version  string
	backoff  *backoff.Policy
	// started is when the agent started, the origin of the boot timeline
	// metrics.
	started time.Time
	runNow  chan struct{}
	reload  chan config.Config
	close   []func()
	// beat is the wall time (UnixNano) of the main loop's last turn; the
	// systemd watchdog is fed only while it is recent.
	beat atomic.Int64

	mu    sync.Mutex
	state State
}

// New returns an Engine. It reaches for nothing until Once or Run.
func New(ctx context.Context, o Options) *Engine {
	e := &Engine{
		cfg: o.Config, root: o.Root, log: o.Log, clock: o.Clock, md: o.Metadata, namer: o.Namer, runner: o.Runner, notifier: o.Notifier,
		m: o.Metrics, version: o.Version, backoff: o.Backoff,
		runNow: make(chan struct{}, 1), reload: make(chan config.Config, 1), state: State{Version: stateVersion},
	}
	if e.m == nil {
		e.m = metrics.New()
	}
	if e.log == nil {
		e.log = zap.NewNop()
	}
	if e.clock == nil {
		e.clock = backoff.RealClock{}
	}
	e.started = e.clock.Now()
	if e.notifier == nil {
		e.notifier = systemd.NewNotifier(e.log)
	}
	if e.md == nil {
		e.ownMD = true
		e.md = e.newMetadata(o.Config)
	}
	if e.namer == nil {
		m := hostname.New(ctx, o.Root, e.log.Named("hostname"))
		e.namer = m
		e.close = append(e.close, m.Close)
	}
	if e.runner == nil {
		e.runner = e.chooseRunner(ctx)
	}
	return e
}

// newMetadata builds the IMDS client the configuration describes.
func (e *Engine) newMetadata(cfg config.Config) Metadata {
	return imds.New(imds.Options{
		Endpoint:    cfg.IMDS.Endpoint,
		AllowIMDSv1: cfg.IMDS.AllowIMDSv1,
		TokenTTL:    cfg.IMDS.TokenTTL.D(),
		Clock:       e.clock,
		Log:         e.log.Named("imds"),
		Observe:     e.observeIMDS,
	})
}

// observeIMDS counts IMDS requests and their failures. A 404 on an
// optional path (no user-data, no notice) is an answer, not a failure.
func (e *Engine) observeIMDS(path string, err error) {
	e.m.IMDSRequests.WithLabelValues(path).Inc()
	var ie *imds.Error
	if errors.As(err, &ie) && ie.Status != http.StatusNotFound {
		e.m.IMDSErrors.WithLabelValues(ie.Kind()).Inc()
	}
	e.m.Changed()
}

// chooseRunner runs chef-client as a transient unit when systemd manages
// the agent on the real root, so that a run survives an agent restart and
// has its own journal stream; as a child process otherwise.
func (e *Engine) chooseRunner(ctx context.Context) chef.Runner {
	log := e.log.Named("chef")
	if os.Getenv("INVOCATION_ID") != "" && filepath.Clean(e.root) == "/" {
		u, err := chef.NewUnitRunner(ctx, log)
		if err == nil {
			e.close = append(e.close, u.Close)
			return u
		}
		log.Warn("cannot reach systemd; chef-client runs as a child process", zap.Error(err))
	}
	return chef.ProcessRunner{Log: log, Clock: e.clock}
}

// retryPolicy is p, unless Options.Backoff replaced every policy.
func (e *Engine) retryPolicy(p backoff.Policy) backoff.Policy {
	if e.backoff != nil {
		return *e.backoff
	}
	return p
}

// Close releases what the Engine holds (D-Bus connections).
func (e *Engine) Close() {
	for _, c := range e.close {
		c()
	}
}

// Step is one timed step of a pass.
type Step struct {
	Name     string        `json:"name"`
	Offset   time.Duration `json:"offset"`
	Duration time.Duration `json:"duration"`
	// Detail says where the time went when it was spent waiting: IMDS not
	// answering, Chef server retries.
	Detail string `json:"detail,omitempty"`
}

// Result is what one bootstrap pass found and did.
type Result struct {
	Identity imds.Identity   `json:"identity"`
	UserData config.UserData `json:"user_data"`
	// Config is the effective configuration: the file with user-data over it.
	Config config.Config `json:"-"`
	// Hostname is the name applied; zero when the name is left alone.
	Hostname hostname.Name `json:"hostname"`
	// HostnameSource says where the name came from.
	HostnameSource string            `json:"hostname_source"`
	Changes        []hostname.Change `json:"changes"`
	// NodeName is the Chef node, when Chef is configured.
	NodeName   string          `json:"node_name,omitempty"`
	Registered chef.Registered `json:"registered"`
	// AlreadyRegistered is true when the state showed this instance
	// registered already, so registration was skipped.
	AlreadyRegistered bool `json:"already_registered"`
	// Warmed is the warm pool state (Warmed:Stopped...) when the instance
	// sits in an Auto Scaling warm pool: named, but not registered until it
	// goes into service.
	Warmed string `json:"warmed,omitempty"`
	// FirstRun is the chef-client run `once` made.
	FirstRun *chef.Outcome `json:"first_run,omitempty"`
	Steps    []Step        `json:"steps"`

	// chef is what the Chef steps do; nil when Chef is not configured.
	chef *chefPlan
}

// stepTimer records the steps of a pass against its start.
type stepTimer struct {
	clock backoff.Clock
	start time.Time
	last  time.Time
	steps []Step
}

func newStepTimer(c backoff.Clock) *stepTimer {
	now := c.Now()
	return &stepTimer{clock: c, start: now, last: now}
}

// done records the step that ran since the previous one ended.
func (t *stepTimer) done(name, detail string) Step {
	now := t.clock.Now()
	s := Step{Name: name, Offset: t.last.Sub(t.start), Duration: now.Sub(t.last), Detail: detail}
	t.steps = append(t.steps, s)
	t.last = now
	return s
}

// Once runs one full bootstrap pass and the first chef-client run (with
// the first-boot JSON) when Chef is configured. Bad user-data or a bad
// setting is an error matching config.ErrInvalid, and then nothing has been
// applied. A chef-client run that fails is an error too.
func (e *Engine) Once(ctx context.Context) (res Result, err error) {
	unlock, err := e.lockAgent()
	if err != nil {
		return res, err
	}
	defer unlock()
	defer func() {
		if err != nil && ctx.Err() == nil {
			e.fail(err, "")
		}
		if p := e.cfg.Metrics.Textfile; p != "" {
			if werr := e.m.WriteTextfile(e.path(p)); werr != nil {
				e.log.Warn("metrics textfile not written", zap.Error(werr))
			}
		}
	}()
	if res, err = e.pass(ctx); err != nil || res.chef == nil || res.Warmed != "" {
		e.idle(res)
		return res, err
	}
	out, err := e.runChef(ctx, res, !e.snapshot().FirstRunDone, res.Config.Chef.RunTimeout.D())
	res.FirstRun = &out
	if err != nil {
		return res, err
	}
	e.idle(res)
	if out.Result.Failed() {
		return res, fmt.Errorf("chef-client run %s: %s (exit code %d)%s", out.ID, out.Result, out.ExitCode, tailText(out.Tail))
	}
	return res, nil
}

// pass runs the bootstrap steps, without chef-client: IMDS, user-data, the
// host name, registration. Everything is decided and validated before the
// first change is made.
func (e *Engine) pass(ctx context.Context) (res Result, err error) {
	timer := newStepTimer(e.clock)
	defer func() { res.Steps = timer.steps }()
	e.startBoot(timer.start)
	e.transition(PhaseWaitingIMDS, "waiting for IMDS")

	id, waited, err := e.md.Wait(ctx, e.cfg.IMDS.WaitTimeout.D())
	if err != nil {
		return res, err
	}
	res.Identity = id
	log := e.log.With(zap.String("instance_id", id.InstanceID))
	detail := ""
	if waited.Attempts > 1 {
		detail = fmt.Sprintf("IMDS answered at attempt %d after: %s", waited.Attempts, strings.Join(waited.Reasons, ", "))
	}
	log.Info("instance identified", zap.String("region", id.Region), zap.String("availability_zone", id.AvailabilityZone),
		zap.Duration("waited", timer.done("imds", detail).Duration))
	e.milestone("imds")
	e.m.Info.Reset()
	e.m.Info.WithLabelValues(e.version, id.InstanceID).Set(1)
	if err := e.adoptInstance(log, id.InstanceID, e.cfg); err != nil {
		return res, err
	}

	raw, err := e.md.UserData(ctx)
	if err != nil {
		return res, fmt.Errorf("read user-data: %w", err)
	}
	cfg, info, err := config.ApplyUserData(e.cfg, raw)
	if err != nil {
		return res, err
	}
	res.Config, res.UserData = cfg, info
	log.Info("user-data read", zap.String("format", info.Format), zap.Strings("keys", info.Keys), zap.Int("bytes", len(raw)))
	for _, why := range info.Ignored {
		log.Info("user-data left alone", zap.String("why", why))
	}
	log.Debug("effective configuration", zap.Any("config", cfg))
	timer.done("user-data", "")

	var name hostname.Name
	if cfg.Hostname.Preserve {
		res.HostnameSource = cfg.Source("hostname.preserve")
	} else if name, res.HostnameSource, err = e.desiredName(ctx, cfg); err != nil {
		return res, err
	}
	res.Hostname = name
	if res.chef, err = e.planChef(cfg, id, name); err != nil {
		return res, err
	}

	switch {
	case cfg.Hostname.Preserve:
		log.Info("hostname preserved, as asked (preserve_hostname)")
	case name.IsZero():
		log.Info("hostname left alone: no name in user-data and hostname.fallback is keep")
	default:
		e.transition(PhaseApplyingHostname, "applying hostname "+name.String())
		changes, err := e.apply(ctx, log, cfg, name)
		res.Changes = changes
		if err != nil {
			return res, err
		}
		log.Info("hostname applied", zap.Stringer("hostname", name), zap.String("from", res.HostnameSource),
			zap.Int("changes", len(changes)), zap.Duration("since_start", e.clock.Now().Sub(timer.start)))
	}
	timer.done("hostname", "")
	e.milestone("hostname")
	e.update(func(s *State) {
		s.Hostname, s.HostnameSource = name.String(), res.HostnameSource
		s.Boot.Steps = timer.steps
	})

	if p := res.chef; p != nil {
		res.NodeName = p.nodeName
		if lc, err := e.md.LifecycleState(ctx); err != nil {
			log.Warn("could not read the Auto Scaling lifecycle state; registering", zap.Error(err))
		} else if strings.HasPrefix(lc, "Warmed:") {
			res.Warmed = lc
			log.Info("in a warm pool: named, registration waits until the instance goes into service", zap.String("lifecycle_state", lc))
			e.update(func(s *State) { s.Boot.Steps = timer.steps })
			return res, nil
		}
		st := e.snapshot()
		_, keyErr := os.Stat(e.path(cfg.Chef.ClientKey))
		if st.NodeName == p.nodeName && st.RegisteredAt != nil && keyErr == nil {
			res.AlreadyRegistered = true
			log.Info("already registered; registration skipped", zap.String("node_name", p.nodeName), zap.Time("registered_at", *st.RegisteredAt))
		} else {
			e.transition(PhaseRegistering, fmt.Sprintf("registering node %s with %s", p.nodeName, cfg.Chef.ServerURL))
			if res.Registered, err = e.register(ctx, log, cfg, p); err != nil {
				return res, err
			}
			now := e.clock.Now()
			e.update(func(s *State) { s.NodeName, s.ClientName, s.RegisteredAt = p.nodeName, p.nodeName, &now })
			fault.Point("state-saved")
		}
		detail := ""
		if res.Registered.Retries > 0 {
			detail = fmt.Sprintf("%d Chef server requests retried", res.Registered.Retries)
		}
		timer.done("register", detail)
		e.milestone("registered")
	}
	e.update(func(s *State) {
		s.Bootstrapped, s.Error = true, ""
		s.Boot.Steps = timer.steps
	})
	return res, nil
}

// apply sets the name and logs each change.
func (e *Engine) apply(ctx context.Context, log *zap.Logger, cfg config.Config, name hostname.Name) ([]hostname.Change, error) {
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

// desiredName decides the host name, in order: the configuration (user-data
// or the file), the configured instance tag, IMDS local-hostname. It returns
// the zero Name when the name is to be left alone.
func (e *Engine) desiredName(ctx context.Context, cfg config.Config) (hostname.Name, string, error) {
	h := cfg.Hostname
	n, err := configuredName(cfg)
	if err != nil || !n.IsZero() {
		return n, cfg.Source("hostname.name"), err
	}
	if h.FromTag != "" {
		v, err := e.md.Tag(ctx, h.FromTag)
		switch {
		case err == nil:
			n, err := hostname.Make(v, h.Domain)
			if err != nil {
				return hostname.Name{}, "", &config.InvalidError{Source: "instance tag " + h.FromTag, Reason: err.Error() + "; fix the tag, or set hostname in user-data"}
			}
			return n, "instance tag " + h.FromTag, nil
		case errors.Is(err, imds.ErrNotFound):
			e.log.Info("no name from the instance tag", zap.String("tag", h.FromTag), zap.Error(err))
		default:
			return hostname.Name{}, "", fmt.Errorf("read instance tag %s: %w", h.FromTag, err)
		}
	}
	if h.Fallback == config.FallbackKeep {
		return hostname.Name{}, "hostname.fallback keep", nil
	}
	local, err := e.md.LocalHostname(ctx)
	if err != nil {
		return hostname.Name{}, "", fmt.Errorf("read local-hostname: %w", err)
	}
	if h.Domain != "" {
		// A baked domain replaces the EC2 one: ip-10-0-7-10.example.internal.
		local, _, _ = strings.Cut(local, ".")
	}
	n, err = hostname.Make(local, h.Domain)
	if err != nil {
		return hostname.Name{}, "", fmt.Errorf("IMDS local-hostname: %w", err)
	}
	return n, "IMDS local-hostname", nil
}

// milestone records, as a metric, how long after the agent's start this
// boot reached a step.
func (e *Engine) milestone(step string) {
	e.m.Timeline.WithLabelValues(step).Set(e.clock.Now().Sub(e.started).Seconds())
	e.m.Changed()
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

// ExitCode maps the outcome of a command to the exit status of the CLI
// contract: 0 success, 1 runtime failure, 2 invalid configuration or
// user-data.
func ExitCode(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, config.ErrInvalid), errors.Is(err, hostname.ErrInvalid), errors.Is(err, chef.ErrInvalid):
		return 2
	default:
		return 1
	}
}
