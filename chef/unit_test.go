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
// With one loaded, it waits for systemd's answer.
func TestRunningAsksSystemdOnlyWhenARunsUnitIsLoaded(t *testing.T) {
	old, current := t.TempDir(), t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(current, "other.service"), nil, 0o644))
	u := &UnitRunner{log: zap.NewNop(), unitDirs: []string{old, current}, ready: make(chan struct{})}

	id, found, err := u.Running(context.Background())
	require.NoError(t, err)
	assert.False(t, found)
	assert.Empty(t, id)

	require.NoError(t, os.WriteFile(filepath.Join(old, UnitName("20261202T0512-1")), nil, 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, found, err = u.Running(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded, "the bus is asked, and has not answered")
	assert.False(t, found)
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
