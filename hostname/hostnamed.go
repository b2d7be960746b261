package hostname

import (
	"context"
	"fmt"

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

func dialHostnamed(ctx context.Context) (*hostnamed, error) {
	conn, err := dbus.ConnectSystemBus(dbus.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("connect to the system bus: %w", err)
	}
	h := &hostnamed{conn: conn, obj: conn.Object(hostnamedName, hostnamedPath)}
	// Reading a property activates hostnamed and proves it answers.
	if _, _, err := h.Names(ctx); err != nil {
		h.close()
		return nil, err
	}
	return h, nil
}

func (h *hostnamed) close() { _ = h.conn.Close() }

func (*hostnamed) String() string { return "systemd-hostnamed" }

func (h *hostnamed) Names(ctx context.Context) (string, string, error) {
	kernel, err := h.property(ctx, "Hostname")
	if err != nil {
		return "", "", err
	}
	static, err := h.property(ctx, "StaticHostname")
	if err != nil {
		return "", "", err
	}
	return kernel, static, nil
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

func (h *hostnamed) SetKernel(ctx context.Context, name string) error {
	// The last argument, interactive=false, keeps polkit from prompting.
	if err := h.obj.CallWithContext(ctx, hostnamedIface+".SetHostname", 0, name, false).Err; err != nil {
		return fmt.Errorf("hostnamed: set hostname %q: %w", name, err)
	}
	return nil
}

func (h *hostnamed) SetStatic(ctx context.Context, name string) error {
	if err := h.obj.CallWithContext(ctx, hostnamedIface+".SetStaticHostname", 0, name, false).Err; err != nil {
		return fmt.Errorf("hostnamed: set static hostname %q: %w", name, err)
	}
	return nil
}
