// Package agent orchestrates the bootstrap of an instance: wait for IMDS,
// read the identity and user-data, decide and apply the host name, register
// with the Chef server, then keep the instance converged and named, and
// remove it from the Chef server when it is terminated. It keeps
// per-instance state, so that a later boot of the same instance does only
// what is left, and a new instance launched from the image starts afresh.
//
// One goroutine owns the state (see machine and life): bootstrap,
// registration, chef-client runs, polls and deregistration are workers that
// report events to it. docs/ARCHITECTURE.md draws the whole of it.
package agent

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/hostname"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/imdsfilter"
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
	Notices(ctx context.Context) imds.Reading
}

// Namer applies host names to the system.
type Namer interface {
	Apply(ctx context.Context, n hostname.Name, p hostname.Policy) ([]hostname.Change, error)
	TameCloudInit() (bool, error)
}

// Notifier tells the service manager how the agent is doing.
type Notifier interface {
	Ready(status string)
	Status(status string)
	Stopping()
	Watchdog()
}

// Options are the Engine's dependencies.
type Options struct {
	// Config is the baked configuration (file over defaults); user-data is
	// applied over it at each bootstrap.
	Config config.Config
	// Root prefixes every path the agent writes.
	Root string
	Log  *zap.Logger
	// Clock paces retries and schedules; nil is the wall clock.
	Clock backoff.Clock
	// Metadata reads IMDS; nil builds a client from the configuration.
	Metadata Metadata
	// Namer applies host names; nil builds a hostname.Manager for Root.
	Namer Namer
	// Runner runs chef-client; nil picks a transient systemd unit when
	// Systemd is set and Root is the real root (a child process when
	// systemd cannot be reached), a child process otherwise.
	Runner chef.Runner
	// Notifier tells systemd the agent's state; nil speaks sd_notify (a
	// no-op when systemd did not start the agent).
	Notifier Notifier
	// Metrics collects the agent's metrics; nil makes a set.
	Metrics *metrics.Metrics
	// Version is the agent's, for the bootagent_info metric.
	Version string
	// Backoff, when set, replaces every retry policy of the agent (Chef
	// server requests at registration, bootstrap and registration retries,
	// failed chef-client runs). The fleet benchmark sets a fixed delay
	// without jitter to show what the policies are worth.
	Backoff *backoff.Policy
	// Systemd is true when systemd runs the agent (it sets INVOCATION_ID).
	Systemd bool
	// Watchdog is how often to tell systemd's watchdog the agent is
	// healthy; 0 when systemd does not watch it.
	Watchdog time.Duration
	// Hostname reads the host's name as it is now, which names the node
	// when the agent leaves the name alone; nil is os.Hostname.
	Hostname func() (string, error)
}

// Engine runs the agent: Once for `bootagent once`, Run for the daemon.
// Its dependencies are fixed at New; each life of the daemon (until a
// reload) has a configuration of its own.
type Engine struct {
	cfg      config.Config
	root     string
	log      *zap.Logger
	clock    backoff.Clock
	md       Metadata
	namer    Namer
	runner   chef.Runner
	notifier Notifier
	filter   *filterKeeper
	m        *metrics.Metrics
	version  string
	backoff  *backoff.Policy
	watchdog time.Duration
	hostname func() (string, error)
	// started is when the agent started, the origin of the boot timeline
	// metrics.
	started time.Time
	trigger chan struct{}
	reload  chan config.Config
	close   []func()
	// key is the node's key pair, made ahead for a first boot's
	// registration (keyAhead).
	keyOnce sync.Once
	key     *keyAhead
	// validatorWarning is said once per process, not at each life.
	validatorWarning sync.Once
	// healthyUntil is the time (UnixNano on the agent's clock) until which
	// the agent counts as healthy; the owner of the state moves it on
	// while its loop turns and its polls end. The systemd watchdog and
	// /healthz read it.
	healthyUntil atomic.Int64
}

// New returns an Engine. It reaches for nothing on the network until Once
// or Run.
func New(ctx context.Context, o Options) *Engine {
	e := &Engine{
		cfg: o.Config, root: o.Root, log: o.Log, clock: o.Clock, md: o.Metadata, namer: o.Namer, runner: o.Runner, notifier: o.Notifier,
		m: o.Metrics, version: o.Version, backoff: o.Backoff, watchdog: o.Watchdog, hostname: o.Hostname,
		trigger: make(chan struct{}, 1), reload: make(chan config.Config, 1),
	}
	if e.m == nil {
		e.m = metrics.New()
	}
	zeroCounters(e.m)
	if e.log == nil {
		e.log = zap.NewNop()
	}
	if e.clock == nil {
		e.clock = backoff.RealClock{}
	}
	if e.hostname == nil {
		e.hostname = os.Hostname
	}
	if e.notifier == nil {
		e.notifier = systemd.NewNotifier(e.log)
	}
	e.started = e.clock.Now()
	e.filter = newFilterKeeper(imdsfilter.New(filterTimeout))
	if e.namer == nil {
		m := hostname.New(ctx, o.Root, e.log.Named("hostname"))
		e.namer = m
		e.close = append(e.close, m.Close)
	}
	if e.runner == nil {
		e.runner = e.chooseRunner(ctx, o.Systemd)
	}
	return e
}

// metadata is the IMDS client for a configuration: the one given in
// Options, or one built for cfg's endpoint.
func (e *Engine) metadata(cfg config.Config) Metadata {
	if e.md != nil {
		return e.md
	}
	return imds.New(imds.Options{
		Endpoint:    cfg.IMDS.Endpoint,
		IPv6:        cfg.IMDS.IPv6(),
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
// has its own journal stream; as a child process otherwise, and when
// systemd cannot be reached.
func (e *Engine) chooseRunner(ctx context.Context, systemd bool) chef.Runner {
	log := e.log.Named("chef")
	p := chef.ProcessRunner{Log: log, Clock: e.clock}
	if systemd && filepath.Clean(e.root) == "/" {
		u := chef.NewUnitRunner(ctx, log, p)
		e.close = append(e.close, u.Close)
		return u
	}
	return p
}

// retryPolicy is p, unless Options.Backoff replaced every policy.
func (e *Engine) retryPolicy(p backoff.Policy) backoff.Policy {
	if e.backoff != nil {
		return *e.backoff
	}
	return p
}

// path takes a system path under the agent's root.
func (e *Engine) path(p string) string { return filepath.Join(e.root, p) }

// Close releases what the Engine holds (D-Bus connections).
func (e *Engine) Close() {
	for _, c := range e.close {
		c()
	}
}

// TriggerRun asks the daemon for a chef-client run now (SIGUSR1). A run
// already going is not doubled.
func (e *Engine) TriggerRun() {
	select {
	case e.trigger <- struct{}{}:
	default:
	}
}

// Reload makes the daemon start a new life with cfg: what is done stays
// done (the state says so), a chef-client run going goes on, and what
// changed is applied.
func (e *Engine) Reload(cfg config.Config) {
	select {
	case <-e.reload:
	default:
	}
	e.reload <- cfg
}

// healthy reports whether the owner of the state turned lately and no poll
// of it is stuck, for the systemd watchdog and /healthz.
func (e *Engine) healthy() bool { return e.clock.Now().UnixNano() < e.healthyUntil.Load() }

// Step is one timed step of a bootstrap.
type Step struct {
	Name     string        `json:"name"`
	Offset   time.Duration `json:"offset"`
	Duration time.Duration `json:"duration"`
	// Detail says where the time went when it was spent waiting: IMDS not
	// answering, Chef server retries.
	Detail string `json:"detail,omitempty"`
}

// Result is what `bootagent once` found and did.
type Result struct {
	Identity imds.Identity   `json:"identity"`
	UserData config.UserData `json:"user_data"`
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
	// Terminating is why the instance is going away, when IMDS says so
	// already: nothing is registered.
	Terminating string `json:"terminating,omitempty"`
	// FirstRun is the chef-client run `once` made.
	FirstRun *chef.Outcome `json:"first_run,omitempty"`
	Steps    []Step        `json:"steps"`
}

// stepTimer records the steps of a bootstrap against its start.
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

// zeroCounters makes every series an alert or a panel counts from exist at
// 0, so that increase() sees its first event and an absent series means
// an absent agent.
func zeroCounters(m *metrics.Metrics) {
	for _, r := range chef.Results {
		m.Runs.WithLabelValues(string(r))
	}
	for _, k := range imds.ErrorKinds {
		m.IMDSErrors.WithLabelValues(k)
	}
	for _, k := range chef.ErrorKinds {
		m.ChefServerErrors.WithLabelValues(k)
	}
	for _, w := range hostname.Whats {
		m.DriftCorrections.WithLabelValues(w)
	}
	for _, o := range []string{"deleted", "incomplete"} {
		m.Deregistrations.WithLabelValues(o)
	}
}

// observeChef counts a failed Chef server request.
func observeChef(m *metrics.Metrics) func(*chef.APIError) {
	return func(e *chef.APIError) {
		m.ChefServerErrors.WithLabelValues(e.Kind()).Inc()
		m.Changed()
	}
}
