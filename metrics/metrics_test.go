package metrics

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap/zaptest"

	"github.com/bootagent/bootagent/internal/testenv"
)

// parse reads the Prometheus text format, failing on anything partial.
func parse(t testing.TB, data []byte) map[string]bool {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(bytes.NewReader(data))
	require.NoError(t, err)
	names := map[string]bool{}
	for name := range families {
		names[name] = true
	}
	return names
}

func TestTheTextfileIsNeverSeenHalfWritten(t *testing.T) {
	root := t.TempDir()
	path := filepath.Join(root, "bootagent.prom")
	m := New()
	m.Info.WithLabelValues("v1", "i-0abc").Set(1)
	m.Phase.WithLabelValues("idle").Set(1)
	ctx, cancel := context.WithCancel(context.Background())
	kept := make(chan struct{})
	go func() {
		defer close(kept)
		m.KeepTextfile(ctx, root, "/bootagent.prom", zaptest.NewLogger(t))
	}()
	m.Changed()
	testenv.Eventually(t, 5*time.Second, func() bool { _, err := os.Stat(path); return err == nil }, "the file is written")

	// The metrics change without pause while the file is read, over and
	// over, as node_exporter would.
	var reads atomic.Int32
	changing := make(chan struct{})
	go func() {
		defer close(changing)
		for i := 0; reads.Load() < 300; i++ {
			m.Runs.WithLabelValues(fmt.Sprint("result", i%7)).Inc()
			m.Changed()
		}
	}()
	for reads.Load() < 300 {
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		names := parse(t, data)
		// Families come sorted: the first and the last are both there.
		require.True(t, names["bootagent_chef_failing_since_timestamp_seconds"] && names["bootagent_phase"], "a whole file, every time")
		reads.Add(1)
	}
	<-changing
	cancel()
	<-kept
	entries, err := os.ReadDir(filepath.Dir(path))
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temporary files left")
}

func TestServeMetricsAndHealth(t *testing.T) {
	testenv.RequirePrivateNetwork(t)
	m := New()
	m.Info.WithLabelValues("v1.2.3", "i-0abc").Set(1)
	var healthy atomic.Bool
	healthy.Store(true)
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- m.Serve(ctx, addr, healthy.Load, zaptest.NewLogger(t)) }()
	testenv.WaitListening(t, addr, 5*time.Second, nil)

	get := func(path string) (int, string) {
		res, err := http.Get("http://" + addr + path)
		require.NoError(t, err)
		defer res.Body.Close()
		body, err := io.ReadAll(res.Body)
		require.NoError(t, err)
		return res.StatusCode, string(body)
	}
	code, body := get("/metrics")
	assert.Equal(t, http.StatusOK, code)
	assert.Contains(t, body, `bootagent_info{instance_id="i-0abc",version="v1.2.3"} 1`)
	assert.Contains(t, body, "\nbootagent_healthy 1\n")
	code, body = get("/healthz")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok\n", body)
	healthy.Store(false)
	code, _ = get("/healthz")
	assert.Equal(t, http.StatusServiceUnavailable, code, "a stalled main loop is unhealthy")
	_, body = get("/metrics")
	assert.Contains(t, body, "\nbootagent_healthy 0\n", "/metrics says what /healthz says")

	cancel()
	require.NoError(t, <-served)
}
