#!/usr/bin/env bash
# Installs what the tests and the demo need, and nothing when it is already
# there: Debian packages with apt-get, Go tools at pinned versions into
# .tools/bin. Run as root on Debian (bookworm). `deps.sh lint` adds the
# linter.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: unshare and mount (private namespaces), ip (loopback in
# the test namespace), hostname (the `hostname -f` check), goiardi (the Chef
# server the tests register with), ruby (`ruby -c` on every client.rb),
# ruby-chef-config (Chef's own loader of client.rb, which must read each
# one as meant), ruby-mixlib-authentication and ohai (Chef's request
# signing and Ohai, on which the Ruby chef-client stand-in is built),
# debootstrap and systemd-container (the boot test's image
# and systemd-nspawn), rpm (to read the .rpm the build makes and install it
# into a scratch root), lintian and rpmlint (the packages' gates; rpmlint
# reads each file's type with python3-magic),
# qemu-user-static (runs the arm64 binary), prometheus (with promtool) and
# prometheus-node-exporter (the monitoring's peers: the tests start their
# own, on loopback in their namespace; on a host whose systemd runs,
# Debian also starts the packaged services, which the tests do not use),
# gnuplot-nox (make bench-fleet's picture), nftables (nft, to read and
# tamper with the IMDS filter's table the way an operator would).
packages=(util-linux mount iproute2 hostname nftables goiardi ruby ruby-chef-config ruby-mixlib-authentication ohai debootstrap systemd-container rpm lintian rpmlint python3-magic qemu-user-static prometheus prometheus-node-exporter gnuplot-nox)
# `deps.sh docs` adds graphviz, which renders docs/phases.svg.
if [[ " $* " == *" docs "* ]]; then
	packages+=(graphviz)
fi

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go tools, pinned. A stamp file records the version installed.
tools_dir="$PWD/.tools/bin"
mkdir -p "$tools_dir"
install_tool() {
	local pkg=$1 version=$2 name=$3
	local stamp="$tools_dir/.$name@$version"
	if [[ -x "$tools_dir/$name" && -e "$stamp" ]]; then
		return
	fi
	echo "deps: go install $pkg@$version"
	GOBIN="$tools_dir" go install "$pkg@$version"
	rm -f "$tools_dir/.$name@"*
	touch "$stamp"
}
install_tool github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock v1.13.0 ec2-metadata-mock
install_tool github.com/goreleaser/nfpm/v2/cmd/nfpm v2.45.2 nfpm
install_tool github.com/cpuguy83/go-md2man/v2 v2.0.7 go-md2man
if [[ " $* " == *" lint "* ]]; then
	install_tool github.com/golangci/golangci-lint/v2/cmd/golangci-lint v2.15.0 golangci-lint
fi
