#!/usr/bin/env bash
# Builds the Debian bookworm image the boot test boots with systemd-nspawn,
# once, and caches it: debootstrap from the mirror apt on this machine uses
# (its default when apt names none), with systemd, D-Bus, goiardi, and
# the Ruby libraries of Chef (ruby-chef-config, ruby-mixlib-authentication,
# ohai) that the Ruby chef-client stand-in is built on.
#
#   e2e-image.sh IMAGE [EXTRA,PACKAGES]
#
# The extra packages make another image from the same list: `make
# bench-boot` adds cloud-init and curl (and python3-cffi-backend, which
# provides a virtual package cloud-init needs and debootstrap does not
# resolve), to boot them beside bootagent.
set -euo pipefail
image=$1
packages=systemd,systemd-sysv,dbus,goiardi,iproute2,hostname,procps,util-linux,libpam-systemd,ruby,ruby-chef-config,ruby-mixlib-authentication,ohai${2:+,$2}
want="bookworm minbase $packages"
if [[ -d $image && -f $image.stamp && $(cat "$image.stamp") == "$want" ]]; then
	exit 0
fi

# The archive this machine's apt already uses (deb822 .sources or
# sources.list), so that a local mirror or proxy is honoured.
mirror=$(
	{
		awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null
		awk '$1 == "deb" && $2 !~ /^\[/ {print $2} $1 == "deb" && $2 ~ /^\[/ {print $3}' /etc/apt/sources.list 2>/dev/null
	} | grep -v -- '-security' | head -n 1 || true
)

rm -rf "$image" "$image.tmp" "$image.stamp"
mkdir -p "$(dirname "$image")"
echo "e2e-image: debootstrap bookworm into $image (once; cached afterwards)"
debootstrap --variant=minbase --include="$packages" bookworm "$image.tmp" ${mirror:+"$mirror"} >"$image.log" 2>&1 || {
	tail -n 30 "$image.log"
	exit 1
}
# A neutral image: no host name of this machine, no machine ID (systemd
# makes one at first boot, as on a fresh EC2 instance).
echo debian >"$image.tmp/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n' >"$image.tmp/etc/hosts"
: >"$image.tmp/etc/machine-id"
mv "$image.tmp" "$image"
echo "$want" >"$image.stamp"
