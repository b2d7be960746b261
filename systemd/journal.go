package systemd

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/coreos/go-systemd/v22/journal"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// NewLogger returns the agent's logger. When stderr is the journal
// (systemd's JOURNAL_STREAM names it), entries go to journald natively, each
// field a journal field: `journalctl -u bootagent NODE_NAME=web01` works.
// Otherwise it writes the console format to w.
func NewLogger(w io.Writer, level zapcore.Level) *zap.Logger {
	if ok, err := journal.StderrIsJournalStream(); err == nil && ok && journal.Enabled() {
		return zap.New(&journalCore{level: level, send: journal.Send, identifier: "bootagent"})
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	enc.EncodeDuration = zapcore.StringDurationEncoder
	// Locked: chef-client's two output streams are logged concurrently.
	return zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.Lock(zapcore.AddSync(w)), level))
}

// journalCore is a zap core that sends entries to journald.
type journalCore struct {
	level      zapcore.LevelEnabler
	send       func(message string, p journal.Priority, vars map[string]string) error
	identifier string
	fields     []zapcore.Field
}

func (c *journalCore) Enabled(l zapcore.Level) bool { return c.level.Enabled(l) }

func (c *journalCore) With(fields []zapcore.Field) zapcore.Core {
	clone := *c
	clone.fields = append(append([]zapcore.Field{}, c.fields...), fields...)
	return &clone
}

func (c *journalCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *journalCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fields {
		f.AddTo(enc)
	}
	vars := make(map[string]string, len(enc.Fields)+2)
	for k, v := range enc.Fields {
		vars[journalField(k)] = journalValue(v)
	}
	vars["SYSLOG_IDENTIFIER"] = c.identifier
	if e.LoggerName != "" {
		vars["LOGGER"] = e.LoggerName
	}
	return c.send(e.Message, priority(e.Level), vars)
}

func (c *journalCore) Sync() error { return nil }

// journalField turns a zap key into a journal field name: upper case,
// letters, digits and underscores, not starting with an underscore (those
// are journald's own).
func journalField(key string) string {
	var b strings.Builder
	for _, r := range strings.ToUpper(key) {
		if r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	name := strings.TrimLeft(b.String(), "_")
	if name == "" || name[0] >= '0' && name[0] <= '9' {
		name = "F_" + name
	}
	return name
}

// journalValue renders a field value as text: strings as they are,
// anything structured as JSON.
func journalValue(v any) string {
	switch t := v.(type) {
	case string:
		return t
	case fmt.Stringer:
		return t.String()
	case []any, map[string]any:
		b, err := json.Marshal(t)
		if err != nil {
			return fmt.Sprint(t)
		}
		return string(b)
	default:
		return fmt.Sprint(t)
	}
}

func priority(l zapcore.Level) journal.Priority {
	switch l {
	case zapcore.DebugLevel:
		return journal.PriDebug
	case zapcore.InfoLevel:
		return journal.PriInfo
	case zapcore.WarnLevel:
		return journal.PriWarning
	case zapcore.ErrorLevel:
		return journal.PriErr
	default:
		return journal.PriCrit
	}
}
