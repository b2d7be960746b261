# %systemd_preun: on erase (no version left), stop and disable the units,
# then delete the IMDS filter (imds.allow_users); on upgrade, leave them to
# %postun.
if [ "$1" -eq 0 ]; then
	systemctl --no-reload disable --now bootagent.path bootagent.service >/dev/null 2>&1 || :
	# With the agent stopped, nothing puts the IMDS filter back.
	bootagent filter remove >/dev/null 2>&1 || :
fi
