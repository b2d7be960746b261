#!/usr/bin/env bash
# The demo: a first boot of a "fresh instance" against AWS's own IMDS
# emulator and a real Chef server (goiardi) holding a small chef-repo
# (test/chef-repo), with the Ruby chef-client stand-in built on Chef's own
# libraries (test/chefclient-ruby-standin: Chef Infra Client cannot be
# installed here). It
# runs in a private network and UTS namespace, so the host name it sets and
# the traffic it sends never leave this sandbox; the files it writes go
# under a temporary root.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
agent=$repo/bin/bootagent
standin=$repo/bin/chefclient-ruby-standin
knife=$repo/bin/knife-standin
mock=$repo/.tools/bin/ec2-metadata-mock

if [[ ${1:-} != inside ]]; then
	work=$(mktemp -d /tmp/bootagent-demo.XXXXXX)
	trap 'rm -rf "$work"' EXIT
	exec_inside() { unshare --net --uts -- "$0" inside "$work"; }
	exec_inside
	exit
fi
work=$2
ip link set lo up

section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# The instance: launched from a stock image, with this user-data.
user_data='#cloud-config
# cloud-init'"'"'s own keys, as an operator would already write them
fqdn: web01.demo.internal
manage_etc_hosts: true
packages: [nginx]
chef:
  run_list: ["role[web]", "recipe[base]"]
  environment: production
  initial_attributes:
    nginx: {worker_processes: 4}'

root=$work/root
mkdir -p "$root/etc"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n\n::1     localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n' >"$root/etc/hosts"
echo debian >"$root/etc/hostname"
hostname ip-10-0-7-10

port=1338
cat >"$work/aemm.json" <<JSON
{"userdata": {"values": {"userdata": "$(printf '%s\n' "$user_data" | base64 -w0)"}},
 "metadata": {"values": {"instance-id": "i-0de70c0ffee000001", "local-hostname": "ip-10-0-7-10.eu-west-1.compute.internal"}},
 "dynamic": {"values": {"instance-identity-document": {"instanceId": "i-0de70c0ffee000001", "region": "eu-west-1",
   "availabilityZone": "eu-west-1a", "accountId": "123456789012", "instanceType": "m7g.large", "imageId": "ami-0123456789abcdef0"}}}}
JSON
# The emulator announces a termination, a spot interruption and a rebalance
# at once unless told otherwise; a day's delay keeps this instance in service.
(cd "$work" && HOME=$work exec "$mock" -n 127.0.0.1 -p "$port" -I -c "$work/aemm.json" \
	-d 86400 --asg-termination-delay-sec 86400 --rebalance-delay-sec 86400 >"$work/aemm.log" 2>&1) &
mock_pid=$!
trap 'kill $mock_pid 2>/dev/null' EXIT
# The Chef server, with authentication on; its validator key is what an
# image bakes at /etc/chef/validation.pem.
chef_port=4545
mkdir -p "$work/goiardi" "$root/etc/chef"
goiardi -A -I 127.0.0.1 -P "$chef_port" -H 127.0.0.1 --conf-root="$work/goiardi" -g error >"$work/goiardi.log" 2>&1 &
goiardi_pid=$!
trap 'kill $mock_pid $goiardi_pid 2>/dev/null' EXIT
for port_ in "$port" "$chef_port"; do
	for _ in $(seq 100); do
		(exec 3<>/dev/tcp/127.0.0.1/$port_) 2>/dev/null && break
		sleep 0.1
	done
done
cp "$work/goiardi/chef-validator.pem" "$root/etc/chef/validation.pem"
knife_() { "$knife" -s "http://127.0.0.1:$chef_port" -u admin -k "$work/goiardi/admin.pem" "$@"; }
# The organisation's chef-repo is on the server before the instance boots.
knife_ upload "$repo/test/chef-repo" >/dev/null

# chef-client runs on the instance, where /etc/hosts is the one bootagent
# wrote: the demo's is under its root, so the stand-in (and Ohai in it) is
# shown that one in a mount namespace of its own.
cat >"$work/chef-client" <<SH
#!/bin/sh
exec unshare --mount -- sh -c 'mount --bind "\$0" /etc/hosts && exec "\$@"' "$root/etc/hosts" "$standin" "\$@"
SH
chmod 0755 "$work/chef-client"

# The baked config: IMDS and the Chef server (the demo's are on loopback).
cat >"$work/config.yaml" <<YAML
imds:
  endpoint: http://127.0.0.1:$port
chef:
  server_url: http://127.0.0.1:$chef_port
  client_command: ["$work/chef-client"]
  # The image's chef-client has not accepted its license; bootagent does.
  license: accept
  # chef-client's cache, under the demo's root rather than this machine's.
  file_cache_path: $root/var/cache/chef
YAML

section "the AWS IMDS emulator (IMDSv2 only) serves this user-data"
printf '%s\n' "$user_data"

section "what bootagent makes of it (bootagent userdata check)"
printf '%s\n' "$user_data" | "$agent" userdata check --config "$work/config.yaml" -

section "before: a fresh instance"
echo "kernel hostname: $(hostname)"
echo "/etc/hostname:   $(cat "$root/etc/hostname")"

section "bootagent once --root $root"
"$agent" once --config "$work/config.yaml" --root "$root"

section "the node, as the Chef server sees it (knife node show, stand-in)"
knife_ node show web01.demo.internal

section "the cookbooks the Chef server handed the node (chef-client's cache)"
(cd "$root/var/cache/chef/cookbooks" && find . -type f | sort | sed 's|^\./|    |')

section "after"
echo "kernel hostname: $(hostname)"
echo "/etc/hostname:   $(cat "$root/etc/hostname")"
echo "hostname -f:     $(unshare --mount -- sh -c 'mount --bind "$1" /etc/hosts && hostname -f' sh "$root/etc/hosts")"
echo "/etc/hosts:"
sed 's/^/    /' "$root/etc/hosts"
echo "/etc/chef:"
ls -l "$root/etc/chef" | sed 's/^/    /'
echo "client.rb:"
sed 's/^/    /' "$root/etc/chef/client.rb"

section "a second pass: nothing to change, no second registration (the validator is gone; the node's own key is enough)"
"$agent" once --config "$work/config.yaml" --root "$root" 2>/dev/null | grep -E '^(hostname|  changed|chef)' || true
