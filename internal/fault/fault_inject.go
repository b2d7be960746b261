//go:build faultinject

package fault

import (
	"os"
	"syscall"
)

// CrashEnv names the point at which a faultinject build kills itself.
const CrashEnv = "BOOTAGENT_CRASH_AT"

// Point kills the process with SIGKILL, leaving everything as a power cut
// would (no deferred cleanup, no buffered writes), when BOOTAGENT_CRASH_AT
// names it.
func Point(name string) {
	if os.Getenv(CrashEnv) == name {
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL cannot be caught; wait for it to land.
	}
}
