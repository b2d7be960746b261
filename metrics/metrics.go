// Package metrics exposes the agent's Prometheus metrics: its boot
// timeline, chef-client runs, IMDS traffic, drift repairs, termination
// notices and deregistrations. It writes them to a node_exporter textfile
// and serves them over HTTP, both off unless configured.
package metrics

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"

	"github.com/bootagent/bootagent/atomicfile"
)

// Metrics holds the agent's collectors.
type Metrics struct {
	// reg holds the agent's own collectors, which the textfile and the
	// listener both carry; runtime the Go runtime's and the process's,
	// which only the listener does (node_exporter has its own, and two of
	// one name in one scrape are an error).
	reg, runtime *prometheus.Registry

	// Timeline is the seconds from the agent's start to each bootstrap
	// milestone: imds, hostname, registered, first_converge.
	Timeline *prometheus.GaugeVec
	// Runs counts chef-client runs by result.
	Runs *prometheus.CounterVec
	// LastRunTimestamp, LastRunDuration and LastRunExitCode describe the
	// last chef-client run, LastSuccessTimestamp the last that did not
	// fail; NextRunTimestamp is when the next is due, RunPeriod the time
	// between two (the interval and this instance's splay), for alerts
	// that measure staleness in runs.
	LastRunTimestamp     prometheus.Gauge
	LastRunDuration      prometheus.Gauge
	LastRunExitCode      prometheus.Gauge
	LastSuccessTimestamp prometheus.Gauge
	FailingSince         prometheus.Gauge
	NextRunTimestamp     prometheus.Gauge
	RunPeriod            prometheus.Gauge
	// IMDSRequests counts requests to IMDS by operation; IMDSErrors counts
	// their failures by kind.
	IMDSRequests *prometheus.CounterVec
	IMDSErrors   *prometheus.CounterVec
	// ChefServerErrors counts failed Chef server requests by kind.
	ChefServerErrors *prometheus.CounterVec
	// DriftCorrections counts host name repairs by what had drifted.
	DriftCorrections *prometheus.CounterVec
	// Notices counts termination, interruption and maintenance notices by
	// kind, once each.
	Notices *prometheus.CounterVec
	// Deregistrations counts removals from the Chef server by outcome.
	Deregistrations *prometheus.CounterVec
	// Phase is 1 for the phase the agent is in, 0 for the others.
	Phase *prometheus.GaugeVec
	// Info carries the version and instance ID as labels.
	Info *prometheus.GaugeVec

	changed chan struct{}
}

// New makes the collectors, registered with a registry of their own (plus
// the Go runtime's and the process's).
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(), runtime: prometheus.NewRegistry(),
		Timeline: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bootagent_bootstrap_seconds",
			Help: "Seconds from the agent's start to each bootstrap milestone of this boot.",
		}, []string{"step"}),
		Runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bootagent_chef_runs_total",
			Help: "chef-client runs, by result (Chef RFC 062 names).",
		}, []string{"result"}),
		LastRunTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bootagent_chef_last_run_timestamp_seconds",
			Help: "When the last chef-client run started, in Unix seconds.",
		}),
		LastRunDuration: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bootagent_chef_last_run_duration_seconds",
			Help: "How long the last chef-client run took.",
		}),
		LastRunExitCode: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bootagent_chef_last_run_exit_code",
			Help: "The exit code of the last chef-client run (-1 when a signal ended it).",
		}),
		LastSuccessTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bootagent_chef_last_success_timestamp_seconds",
			Help: "When the last chef-client run that did not fail started, in Unix seconds (reboot and upgrade results included).",
		}),
		FailingSince: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bootagent_chef_failing_since_timestamp_seconds",
			Help: "When the first of the failed chef-client runs since the last that did not fail started, in Unix seconds; 0 while the last run did not fail.",
		}),
		RunPeriod: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bootagent_chef_run_period_seconds",
			Help: "Seconds between two scheduled chef-client runs: chef.interval and this instance's splay (0 when bootagent runs none).",
		}),
		NextRunTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bootagent_chef_next_run_timestamp_seconds",
			Help: "When the next chef-client run is due, in Unix seconds.",
		}),
		IMDSRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bootagent_imds_requests_total",
			Help: "Requests to the instance metadata service, by path.",
		}, []string{"path"}),
		IMDSErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bootagent_imds_errors_total",
			Help: "Failed requests to the instance metadata service, by kind.",
		}, []string{"kind"}),
		ChefServerErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bootagent_chef_server_errors_total",
			Help: "Failed requests to the Chef server (registration, deregistration), by kind.",
		}, []string{"kind"}),
		DriftCorrections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bootagent_hostname_drift_corrections_total",
			Help: "Host name repairs, by what had drifted.",
		}, []string{"what"}),
		Notices: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bootagent_notices_total",
			Help: "IMDS notices seen, once each: termination, spot interruption, rebalance, maintenance.",
		}, []string{"kind"}),
		Deregistrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bootagent_deregistrations_total",
			Help: "Removals of the node and client from the Chef server, by outcome.",
		}, []string{"outcome"}),
		Phase: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bootagent_phase",
			Help: "1 for the phase the agent is in.",
		}, []string{"phase"}),
		Info: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bootagent_info",
			Help: "The agent's version and the instance it runs on.",
		}, []string{"version", "instance_id"}),
		changed: make(chan struct{}, 1),
	}
	m.reg.MustRegister(m.Timeline, m.Runs, m.LastRunTimestamp, m.LastRunDuration, m.LastRunExitCode, m.LastSuccessTimestamp, m.FailingSince, m.NextRunTimestamp, m.RunPeriod,
		m.IMDSRequests, m.IMDSErrors, m.ChefServerErrors, m.DriftCorrections, m.Notices, m.Deregistrations, m.Phase, m.Info)
	m.runtime.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Changed tells the textfile writer that a metric changed. Calls while a
// write is pending coalesce into it.
func (m *Metrics) Changed() {
	select {
	case m.changed <- struct{}{}:
	default:
	}
}

// WriteTextfile writes the metrics to name under root now, atomically
// (node_exporter never reads a half-written file), and inside the root as
// every file the agent writes.
func (m *Metrics) WriteTextfile(root, name string) error {
	mfs, err := m.reg.Gather()
	if err != nil {
		return fmt.Errorf("write metrics textfile %s: %w", name, err)
	}
	var buf bytes.Buffer
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&buf, mf); err != nil {
			return fmt.Errorf("write metrics textfile %s: %w", name, err)
		}
	}
	if _, err := atomicfile.WriteFile(root, name, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("metrics textfile: %w", err)
	}
	return nil
}

// KeepTextfile rewrites the textfile after every change until ctx ends.
func (m *Metrics) KeepTextfile(ctx context.Context, root, name string, log *zap.Logger) {
	failing := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.changed:
		}
		err := m.WriteTextfile(root, name)
		switch {
		case err != nil && err.Error() != failing:
			failing = err.Error()
			log.Warn("metrics textfile not written", zap.Error(err))
		case err == nil && failing != "":
			failing = ""
			log.Info("metrics textfile written again", zap.String("path", name))
		}
	}
}

// Serve serves /metrics and /healthz on addr until ctx ends. healthy says
// whether the agent's main loop is turning; /metrics says it too, as
// bootagent_healthy, which only the listener has (a textfile is not read
// when it is written, and a stalled agent stops writing it).
func (m *Metrics) Serve(ctx context.Context, addr string, healthy func() bool, log *zap.Logger) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listener: %w", err)
	}
	health := prometheus.NewRegistry()
	health.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "bootagent_healthy",
		Help: "1 while the agent's main loop turns and no poll is stuck, as /healthz answers 200; 0 as it answers 503.",
	}, func() float64 {
		if healthy() {
			return 1
		}
		return 0
	}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(prometheus.Gatherers{m.reg, m.runtime, health}, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if !healthy() {
			http.Error(w, "the agent's main loop is stalled", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	log.Info("serving metrics", zap.String("listen", l.Addr().String()))
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics listener: %w", err)
	}
	return nil
}
