package agent

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/chef"
	"github.com/bootagent/bootagent/config"
	"github.com/bootagent/bootagent/hostname"
	"github.com/bootagent/bootagent/imds"
	"github.com/bootagent/bootagent/metrics"
)

// sample returns the value of the one sample of family whose labels match.
func sample(t *testing.T, families map[string]*dto.MetricFamily, family string, labels map[string]string) float64 {
	t.Helper()
	f, ok := families[family]
	require.True(t, ok, "no family %s", family)
	for _, m := range f.Metric {
		match := true
		for _, lp := range m.Label {
			if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
				match = false
			}
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		}
	}
	t.Fatalf("no sample of %s with %v", family, labels)
	return 0
}

func TestOnceWritesItsMetricsToTheTextfile(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\nchef_run_list=role[web]\n", func(c *config.Config) {
		c.Metrics.Textfile = "/var/lib/node_exporter/textfile_collector/bootagent.prom"
	})
	dir := filepath.Join(s.root, "var/lib/node_exporter/textfile_collector")
	require.NoError(t, os.MkdirAll(dir, 0o755))
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)

	data, err := os.ReadFile(filepath.Join(dir, "bootagent.prom"))
	require.NoError(t, err)
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(bytes.NewReader(data))
	require.NoError(t, err)

	assert.Equal(t, 1.0, sample(t, families, "bootagent_chef_runs_total", map[string]string{"result": "success"}))
	assert.Equal(t, 0.0, sample(t, families, "bootagent_chef_last_run_exit_code", nil))
	assert.Positive(t, sample(t, families, "bootagent_chef_last_run_timestamp_seconds", nil))
	assert.Equal(t, sample(t, families, "bootagent_chef_last_run_timestamp_seconds", nil), sample(t, families, "bootagent_chef_last_success_timestamp_seconds", nil), "the run succeeded")
	assert.Zero(t, sample(t, families, "bootagent_chef_failing_since_timestamp_seconds", nil))
	assert.Zero(t, sample(t, families, "bootagent_chef_run_period_seconds", nil), "once schedules no runs")
	_, runtime := families["go_goroutines"]
	assert.False(t, runtime, "the Go runtime's metrics are node_exporter's own: the textfile has none")
	var previous float64
	for _, step := range []string{"imds", "hostname", "registered", "first_converge"} {
		v := sample(t, families, "bootagent_bootstrap_seconds", map[string]string{"step": step})
		assert.Positive(t, v, step)
		assert.GreaterOrEqual(t, v, previous, "%s comes after the step before", step)
		previous = v
	}
	assert.Equal(t, 1.0, sample(t, families, "bootagent_imds_requests_total", map[string]string{"path": "/latest/api/token"}), "one token")
	assert.Equal(t, 1.0, sample(t, families, "bootagent_imds_requests_total", map[string]string{"path": "/latest/user-data"}))
	assert.Equal(t, 1.0, sample(t, families, "bootagent_info", map[string]string{"instance_id": "i-0123456789abcdef0"}))
	assert.Equal(t, 1.0, sample(t, families, "bootagent_phase", map[string]string{"phase": "idle"}))
	// Every counter an alert takes increase() of is there from the start,
	// at 0: no IMDS errors (a 404 is not one), no timeouts, no repairs.
	require.Len(t, families["bootagent_imds_errors_total"].GetMetric(), len(imds.ErrorKinds))
	for _, k := range imds.ErrorKinds {
		assert.Zero(t, sample(t, families, "bootagent_imds_errors_total", map[string]string{"kind": k}), k)
	}
	assert.Zero(t, sample(t, families, "bootagent_chef_runs_total", map[string]string{"result": "timeout"}))
	assert.Zero(t, sample(t, families, "bootagent_hostname_drift_corrections_total", map[string]string{"what": hostname.WhatKernel}))
	assert.Zero(t, sample(t, families, "bootagent_deregistrations_total", map[string]string{"outcome": "incomplete"}))
}

func TestEveryLogLineAboutTheInstanceNamesIt(t *testing.T) {
	s := newChefSetup(t, "hostname=web01\nchef_run_list=role[web]\n")
	logs := s.logs
	_, err := s.engine.Once(context.Background())
	require.NoError(t, err)
	identified := false
	for _, e := range logs.All() {
		if e.Message == "instance identified" {
			identified = true
		}
		if !identified {
			continue
		}
		fields := e.ContextMap()
		assert.Equal(t, "i-0123456789abcdef0", fields["instance_id"], "%q lacks instance_id", e.Message)
		if _, inRun := fields["run_id"]; !inRun && (e.Message == "Run List is [role[web]]" || e.Message == "chef-client started") {
			t.Errorf("%q, a line of a chef-client run, lacks run_id", e.Message)
		}
	}
	assert.True(t, identified)
}

// A restarted agent shows the runs its state recorded, not none: an alert
// on a stale converge does not fire because the agent restarted, nor
// stay silent because it did.
func TestARestartedAgentShowsTheRunsOfItsState(t *testing.T) {
	start := time.Date(2026, 12, 2, 6, 0, 0, 0, time.UTC)
	next := start.Add(30 * time.Minute)
	success := start.Add(-time.Hour)
	m := metrics.New()
	newMachine(machineOptions{log: zap.NewNop(), metrics: m, clock: backoff.RealClock{}, retry: noJitter}, State{
		Version: stateVersion, InstanceID: "i-0123456789abcdef0",
		LastRun:     &chef.Outcome{Start: start, Duration: 42 * time.Second, ExitCode: 1, Result: chef.ResultFailed},
		LastSuccess: &success, FailingSince: &start, NextRun: &next,
	})
	assert.Equal(t, float64(start.Unix()), gauge(t, m.LastRunTimestamp))
	assert.Equal(t, 42.0, gauge(t, m.LastRunDuration))
	assert.Equal(t, 1.0, gauge(t, m.LastRunExitCode))
	assert.Equal(t, float64(success.Unix()), gauge(t, m.LastSuccessTimestamp))
	assert.Equal(t, float64(start.Unix()), gauge(t, m.FailingSince))
	assert.Equal(t, float64(next.Unix()), gauge(t, m.NextRunTimestamp))
}

func gauge(t *testing.T, g prometheus.Gauge) float64 {
	t.Helper()
	var m dto.Metric
	require.NoError(t, g.Write(&m))
	return m.GetGauge().GetValue()
}
