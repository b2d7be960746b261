package chef

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/bootagent/bootagent/backoff"
	"github.com/bootagent/bootagent/internal/testenv"
)

// BenchmarkGenerateKey is the part of registration spent making the
// instance's 2048-bit RSA key.
func BenchmarkGenerateKey(b *testing.B) {
	for b.Loop() {
		if _, err := GenerateKey(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRegister registers a new node with goiardi on loopback per
// iteration (client, then node), with keys made beforehand, and reports
// the median and worst registration time.
func BenchmarkRegister(b *testing.B) {
	g := testenv.StartGoiardi(b)
	vkey := mustRead(b, g.ValidatorKey)
	dir := b.TempDir()
	var times []time.Duration
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		key, err := GenerateKey()
		if err != nil {
			b.Fatal(err)
		}
		r := &Registrar{
			Server: ServerOptions{URL: g.URL, AuthProtocol: "1.3", SSLVerify: true}, Log: zap.NewNop(),
			Backoff: backoff.Policy{Initial: time.Second, Max: time.Second}, Budget: time.Second, Clock: backoff.RealClock{},
			NewKey: func() ([]byte, error) { return key, nil },
		}
		reg := Registration{
			NodeName: fmt.Sprintf("bench-%d", i), ClientKeyPath: filepath.Join(dir, fmt.Sprintf("client-%d.pem", i)),
			ValidatorName: g.ValidatorName, ValidatorKey: vkey,
			Node: Node{RunList: []string{"role[web]"}},
		}
		b.StartTimer()
		start := time.Now()
		if _, err := r.Register(context.Background(), reg); err != nil {
			b.Fatal(err)
		}
		times = append(times, time.Since(start))
	}
	slices.Sort(times)
	b.ReportMetric(float64(times[len(times)/2])/float64(time.Millisecond), "ms-p50")
	b.ReportMetric(float64(times[len(times)-1])/float64(time.Millisecond), "ms-max")
}

func mustRead(tb testing.TB, path string) []byte {
	tb.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return data
}
