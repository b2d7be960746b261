#!/bin/sh
# go test -exec: runs one test binary in a UTS and a network namespace of
# its own (loopback only, brought up), below the namespace `make test`
# already made. Tests may then set the kernel host name and change nftables
# without touching the machine's, or another package's running beside them.
exec unshare --uts --net -- sh -c 'ip link set lo up && exec "$@"' sh "$@"
