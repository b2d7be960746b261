// Package systemd speaks to systemd: the sd_notify protocol (READY, STATUS,
// WATCHDOG, STOPPING) and journald-aware logging.
package systemd

import (
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// Notifier sends sd_notify messages. Without NOTIFY_SOCKET (not started by
// systemd as Type=notify) every call does nothing.
type Notifier struct {
	log *zap.Logger
}

// NewNotifier returns a Notifier that logs its own failures to log.
func NewNotifier(log *zap.Logger) *Notifier { return &Notifier{log: log} }

func (n *Notifier) send(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.log.Warn("sd_notify failed", zap.String("state", state), zap.Error(err))
	}
}

// Ready tells systemd the service is up, with a status line.
func (n *Notifier) Ready(status string) { n.send(daemon.SdNotifyReady + "\nSTATUS=" + oneLine(status)) }

// Status sets the line `systemctl status` shows.
func (n *Notifier) Status(status string) { n.send("STATUS=" + oneLine(status)) }

// Stopping tells systemd the service is shutting down.
func (n *Notifier) Stopping() { n.send(daemon.SdNotifyStopping) }

// Watchdog tells systemd the service is alive.
func (n *Notifier) Watchdog() { n.send(daemon.SdNotifyWatchdog) }

// WatchdogInterval returns how often to send WATCHDOG=1 (half the unit's
// WatchdogSec, as sd_watchdog_enabled(3) advises), or false when systemd
// does not watch this process.
func WatchdogInterval() (time.Duration, bool) {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil || d == 0 {
		return 0, false
	}
	return d / 2, true
}

// oneLine keeps a status to one line: sd_notify is line-oriented.
func oneLine(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "\r", " "), "\n", " ")
}
