#!/usr/bin/env bash
# Prints the changelog nfpm writes into the packages of VERSION (version-
# release, as both formats name an entry):
# packaging/changelog.yaml with its UNRELEASED entry under VERSION, dated
# by the commit (the same commit packages the same bytes), or without it
# when VERSION is a release the file lists.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$1
date=$(git log -1 --format=%cI 2>/dev/null || echo 1970-01-01T00:00:00Z)
released=false
grep -qx -- "- semver: $version" packaging/changelog.yaml && released=true
awk -v version="$version" -v date="$date" -v released="$released" '
/^#/ { next }
/^- semver: / { unreleased = ($3 == "UNRELEASED") }
unreleased && released == "true" { next }
unreleased && /^- semver: / { print "- semver: " version; next }
unreleased && /^  date: / { print "  date: " date; next }
{ print }' packaging/changelog.yaml
