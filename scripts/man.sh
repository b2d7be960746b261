#!/usr/bin/env bash
# Renders the man pages into OUT (bin/man) with go-md2man: bootagent(8)
# from docs/man/bootagent.8.md, and bootagent.yaml(5) from
# docs/man/bootagent.yaml.5.md with its KEYS taken from the README's
# configuration reference (one source for both), each table row a tagged
# paragraph: a table of that width does not fit a terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bin/man}
md2man=.tools/bin/go-md2man
mkdir -p "$out"
"$md2man" -in docs/man/bootagent.8.md -out "$out/bootagent.8"
keys=$(awk '
/^## Configuration reference/ { on = 1; next }
/^## / { on = 0 }
on && /^\| `/ {
	n = split($0, f, / \| /)
	key = f[1]; sub(/^\| /, "", key); gsub(/`/, "", key)
	meaning = f[3]; for (i = 4; i <= n; i++) meaning = meaning " | " f[i]
	sub(/ \|$/, "", meaning)
	printf "**%s** (default %s)\n:   %s\n\n", key, f[2], meaning
}' README.md)
if [[ -z $keys ]]; then
	echo "man.sh: no configuration keys found in README.md" >&2
	exit 1
fi
awk -v keys="$keys" '$0 == "@KEYS@" { print keys; next } { print }' docs/man/bootagent.yaml.5.md >"$out/bootagent.yaml.5.md"
"$md2man" -in "$out/bootagent.yaml.5.md" -out "$out/bootagent.yaml.5"
rm "$out/bootagent.yaml.5.md"
# The packages carry them compressed, as Debian and Fedora policies ask
# (-n: no name or time stamp, so that the same source gives the same bytes).
gzip -9nkf "$out/bootagent.8" "$out/bootagent.yaml.5"
