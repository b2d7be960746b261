#!/bin/sh
# Enables the agent; it starts at the next boot. It is not started now: on
# a machine being baked into an image, starting it would register the build
# machine as a Chef node.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
# Enabling works without a running systemd (in a chroot, in an image).
systemctl enable bootagent.service bootagent.path >/dev/null 2>&1 || true
exit 0
