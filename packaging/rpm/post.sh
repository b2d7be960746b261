# %systemd_post: on a new installation the units take their preset
# (the package's own preset enables them), and are not started: that would
# register the machine the image is being baked on as a Chef node.
if [ "$1" -eq 1 ]; then
	systemctl --no-reload preset bootagent.service bootagent.path >/dev/null 2>&1 || :
fi
