# %systemd_postun_with_restart: after an upgrade, restart the agent if it
# runs; always reload systemd's view of the units.
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -ge 1 ]; then
	systemctl try-restart bootagent.service >/dev/null 2>&1 || :
fi
