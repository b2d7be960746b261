#!/usr/bin/env bash
# Prints the notices of what the binary is made of besides bootagent: Go's
# standard library and runtime, and each module `go list` says the agent
# is compiled from for the architectures it ships for, with its license, notice and patents files as the
# module ships them. The binary is static, so every one of them is
# distributed with it, and their licenses ask for their notices to go too.
set -euo pipefail
cd "$(dirname "$0")/.."
section() {
	printf '%s\n%s\n\n' "$1" "$(printf '%*s' ${#1} '' | tr ' ' =)"
}
section "Go $(go env GOVERSION | sed 's/^go//'): the standard library and runtime"
cat "$(go env GOROOT)/LICENSE"
for arch in amd64 arm64; do
	CGO_ENABLED=0 GOOS=linux GOARCH=$arch go list -deps -f '{{with .Module}}{{if not .Main}}{{.Path}} {{.Version}} {{.Dir}}{{end}}{{end}}' ./cmd/bootagent
done | sort -u |
	while read -r path version dir; do
		files=$(find "$dir" -maxdepth 1 -type f \( -iname 'licen[cs]e*' -o -iname 'copying*' -o -iname 'notice*' -o -iname 'patents*' \) ! -name '*.go' | sort)
		if [[ -z $files ]]; then
			echo "notices.sh: $path $version ships no license file" >&2
			exit 1
		fi
		printf '\n\n'
		section "$path $version"
		for f in $files; do
			cat "$f"
			echo
		done
	done
