package systemd

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
)

// listenNotify plays systemd's side of sd_notify: a datagram socket named by
// NOTIFY_SOCKET.
func listenNotify(t *testing.T) *net.UnixConn {
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return conn
}

func receive(t *testing.T, conn *net.UnixConn) string {
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	require.NoError(t, err)
	return string(buf[:n])
}

func TestNotifierSpeaksSdNotify(t *testing.T) {
	conn := listenNotify(t)
	n := NewNotifier(zaptest.NewLogger(t))

	n.Ready("idle, next chef-client run at 10:30")
	assert.Equal(t, "READY=1\nSTATUS=idle, next chef-client run at 10:30", receive(t, conn))
	n.Status("failed: bad\nuser-data")
	assert.Equal(t, "STATUS=failed: bad user-data", receive(t, conn), "a status stays on one line")
	n.Watchdog()
	assert.Equal(t, "WATCHDOG=1", receive(t, conn))
	n.Stopping()
	assert.Equal(t, "STOPPING=1", receive(t, conn))
}

func TestNotifierWithoutSystemdDoesNothing(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := NewNotifier(zaptest.NewLogger(t))
	n.Ready("x") // Must not fail or block.
}

func TestWatchdogIntervalIsHalfTheUnitsWatchdog(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "30000000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	d, ok := WatchdogInterval()
	require.True(t, ok)
	assert.Equal(t, 15*time.Second, d)

	t.Setenv("WATCHDOG_PID", "1")
	_, ok = WatchdogInterval()
	assert.False(t, ok, "a watchdog meant for another process")
}

func TestJournalCoreSendsFieldsAsJournalFields(t *testing.T) {
	type entry struct {
		msg  string
		p    journal.Priority
		vars map[string]string
	}
	var got []entry
	core := &journalCore{level: zapcore.DebugLevel, identifier: "bootagent", send: func(m string, p journal.Priority, v map[string]string) error {
		got = append(got, entry{m, p, v})
		return nil
	}}
	log := zap.New(core).Named("chef").With(zap.String("instance_id", "i-0abc"))
	log.Warn("chef-client run failed", zap.String("node_name", "web01"), zap.Int("exit_code", 1),
		zap.Duration("duration", 90*time.Second), zap.Strings("tail", []string{"a", "b"}), zap.String("run-id", "r1"))

	require.Len(t, got, 1)
	assert.Equal(t, "chef-client run failed", got[0].msg)
	assert.Equal(t, journal.PriWarning, got[0].p)
	assert.Equal(t, map[string]string{
		"INSTANCE_ID":       "i-0abc",
		"NODE_NAME":         "web01",
		"EXIT_CODE":         "1",
		"DURATION":          "1m30s",
		"TAIL":              `["a","b"]`,
		"RUN_ID":            "r1",
		"SYSLOG_IDENTIFIER": "bootagent",
		"LOGGER":            "chef",
	}, got[0].vars)
}

func TestJournalFieldNames(t *testing.T) {
	assert.Equal(t, "NODE_NAME", journalField("node_name"))
	assert.Equal(t, "A_B_C", journalField("a.b-c"))
	assert.Equal(t, "SYSTEMD_UNIT", journalField("_systemd_unit"), "journald's own trusted fields cannot be forged")
	assert.Equal(t, "F_1X", journalField("1x"))
}
