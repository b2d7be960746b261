package chef

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
)

// A first start of the agent in a boot asks nothing of systemd: with no
// run's unit loaded, Running answers before the bus does (here, never).
// With one loaded, or a directory it cannot read, it waits for systemd.
func TestRunningAsksSystemdOnlyWhenARunsUnitMayBeLoaded(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "other.service"), nil, 0o644))
	u := &UnitRunner{log: zap.NewNop(), unitDir: dir, ready: make(chan struct{})}
	id, found, err := u.Running(context.Background())
	require.NoError(t, err)
	assert.False(t, found)
	assert.Empty(t, id)
	u.unitDir = filepath.Join(dir, "absent")
	_, found, err = u.Running(context.Background())
	require.NoError(t, err, "no transient units at all")
	assert.False(t, found)

	asks := func(why string) {
		t.Helper()
		asked := make(chan struct{})
		go func() {
			defer close(asked)
			_, _, err := u.Running(context.Background())
			assert.ErrorIs(t, err, os.ErrClosed, why)
		}()
		select {
		case <-asked:
			t.Fatalf("%s: Running answered without waiting for systemd", why)
		case <-time.After(20 * time.Millisecond):
		}
		u.err = os.ErrClosed
		close(u.ready)
		<-asked
		u.ready, u.err = make(chan struct{}), nil
	}
	u.unitDir = dir
	require.NoError(t, os.WriteFile(filepath.Join(dir, UnitName("20261202T0512-1")), nil, 0o644))
	asks("a run's unit is loaded")
	u.unitDir = filepath.Join(dir, "other.service")
	asks("the directory cannot be read")
}

// A connection made (or failed) is what a caller whose context has ended
// gets, so that a run told to end still stops its unit.
func TestTheConnectionWinsOverAnEndedContext(t *testing.T) {
	u := &UnitRunner{ready: make(chan struct{}), err: os.ErrClosed}
	close(u.ready)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 100 {
		_, err := u.connection(ctx)
		require.ErrorIs(t, err, os.ErrClosed)
	}
}

type recordingRunner struct{ ran []string }

func (r *recordingRunner) Run(_ context.Context, spec RunSpec) (Outcome, error) {
	r.ran = append(r.ran, spec.ID)
	return Outcome{ID: spec.ID, Result: ResultSuccess}, nil
}

// Where systemd cannot be reached, a run is a child process, as it is
// without systemd.
func TestARunWithoutSystemdGoesToTheFallback(t *testing.T) {
	fallback := &recordingRunner{}
	u := &UnitRunner{log: zap.NewNop(), fallback: fallback, ready: make(chan struct{}), err: os.ErrNotExist}
	close(u.ready)
	out, err := u.Run(context.Background(), RunSpec{ID: "r1", Command: []string{"chef-client"}})
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, out.Result)
	assert.Equal(t, []string{"r1"}, fallback.ran)
	_, err = u.Follow(context.Background(), "r1")
	assert.ErrorIs(t, err, os.ErrNotExist, "a run cannot be followed without systemd")
}
