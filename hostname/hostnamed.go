package hostname

import (
	"context"
	"fmt"
	"time"

	"github.com/godbus/dbus/v5"
)

const (
	hostnamedName  = "org.freedesktop.hostname1"
	hostnamedPath  = dbus.ObjectPath("/org/freedesktop/hostname1")
	hostnamedIface = "org.freedesktop.hostname1"
)

// hostnamed sets names through systemd-hostnamed on the system bus, which
// writes /etc/hostname itself and tells the rest of the system.
type hostnamed struct {
	conn *dbus.Conn
	obj  dbus.BusObject
}

// dialHostnamed connects to hostnamed, for as long as ctx lasts, giving it
// timeout to answer (D-Bus may have to start it).
func dialHostnamed(ctx context.Context, timeout time.Duration) (*hostnamed, error) {
	conn, err := dbus.ConnectSystemBus(dbus.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("connect to the system bus: %w", err)
	}
	h := &hostnamed{conn: conn, obj: conn.Object(hostnamedName, hostnamedPath)}
	// Reading a property activates hostnamed and proves it answers.
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := h.Static(actx); err != nil {
		h.close()
		return nil, err
	}
	return h, nil
}

func (h *hostnamed) close() { _ = h.conn.Close() }

func (h *hostnamed) Static(ctx context.Context) (string, error) {
	return h.property(ctx, "StaticHostname")
}

func (h *hostnamed) property(ctx context.Context, name string) (string, error) {
	var v dbus.Variant
	if err := h.obj.CallWithContext(ctx, "org.freedesktop.DBus.Properties.Get", 0, hostnamedIface, name).Store(&v); err != nil {
		return "", fmt.Errorf("hostnamed: read %s: %w", name, err)
	}
	s, ok := v.Value().(string)
	if !ok {
		return "", fmt.Errorf("hostnamed: %s is a %s, not a string", name, v.Signature())
	}
	return s, nil
}

func (h *hostnamed) SetStatic(ctx context.Context, name string) error {
	// The last argument, interactive=false, keeps polkit from prompting.
	if err := h.obj.CallWithContext(ctx, hostnamedIface+".SetStaticHostname", 0, name, false).Err; err != nil {
		return fmt.Errorf("hostnamed: set static hostname %q: %w", name, err)
	}
	return nil
}
