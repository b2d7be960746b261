#!/bin/sh
# Stops and disables the agent when the package is removed, not when it is
# upgraded. Debian passes "remove" (or "upgrade"); rpm passes the number of
# versions left, 0 on removal.
set -e
case "$1" in
remove | 0)
	if [ -d /run/systemd/system ]; then
		systemctl stop bootagent.path bootagent.service >/dev/null 2>&1 || true
	fi
	systemctl disable bootagent.service bootagent.path >/dev/null 2>&1 || true
	;;
esac
exit 0
