#!/bin/sh
# Forgets the units, and on purge the agent's state. The config file is the
# package manager's to keep or remove.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = "purge" ]; then
	rm -rf /var/lib/bootagent
fi
exit 0
