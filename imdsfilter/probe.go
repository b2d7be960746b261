package imdsfilter

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"

	"golang.org/x/sys/unix"
)

// DialAs opens a TCP connection to ep from a socket of uid, and closes it:
// nil means uid's sockets reach ep. A socket belongs to the file-system uid
// of the thread that makes it, so the dial runs on a thread of its own with
// that uid (setfsuid(2) changes only the calling thread), which ends with
// the dial instead of going back to the runtime. It needs CAP_SETUID.
func DialAs(ctx context.Context, ep netip.AddrPort, uid uint32) error {
	done := make(chan error, 1)
	go func() {
		// Never unlocked: the thread leaves with the goroutine, so no
		// other goroutine ever runs with its uid.
		runtime.LockOSThread()
		if err := unix.Setfsuid(int(uid)); err != nil {
			done <- fmt.Errorf("setfsuid %d: %w", uid, err)
			return
		}
		if got, _ := unix.SetfsuidRetUid(-1); got != int(uid) {
			done <- fmt.Errorf("setfsuid %d: the thread's file-system uid is still %d (the agent lacks CAP_SETUID)", uid, got)
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", ep.String())
		if err == nil {
			err = c.Close()
		}
		done <- err
	}()
	return <-done
}
