# bootagent's build, test and demo entry points. `make help` lists them.
# Everything a target needs is installed by the target itself (scripts/deps.sh):
# Debian packages with apt-get, Go tools at pinned versions into .tools/bin.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

TOOLS   := $(CURDIR)/.tools/bin
VERSION := $(shell git describe --tags --always --dirty 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X main.version=$(VERSION)
# bootagent is built without cgo: a static binary that runs on any glibc
# (or none), with Go's own DNS resolver (files, then DNS per resolv.conf),
# no dynamic loader or libc to map at start, and 1.5 MiB less resident
# (make bench-boot). -trimpath and -buildvcs=false keep it reproducible: the
# same commit builds the same bytes.
GO_BUILD := CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags "$(LDFLAGS)"
# Package versions must start with a digit: a v1.2.3 tag gives 1.2.3, an
# untagged tree 0.0.0+git<commit>.
# PKG_RELEASE is the packaging's revision (Debian's, rpm's release).
PKG_RELEASE := 1
PKG_VERSION := $(shell v=$$(git describe --tags --match 'v[0-9]*' 2>/dev/null) && echo $${v\#v} || echo 0.0.0+git$$(git rev-parse --short HEAD 2>/dev/null || echo unknown))
# ARCH=amd64 or ARCH=arm64 on the command line picks one architecture for
# `make build deb rpm release`; both are built by default, and always for
# the tests, which check both. An ARCH from the environment is not taken.
ARCHES := amd64 arm64
ifeq ($(origin ARCH),command line)
ifeq ($(filter $(ARCH),$(ARCHES)),)
$(error ARCH=$(ARCH): amd64 or arm64)
endif
ARCHES := $(ARCH)
endif
# The packages' files carry the commit's time, not the build's: the same
# commit packages the same bytes.
export SOURCE_DATE_EPOCH := $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
GO_TEST_ENV := PATH="$(CURDIR)/bin:$(TOOLS):$$PATH" GOFLAGS=-mod=readonly GOPROXY=off

# FUZZTIME is how long `make fuzz` runs each fuzz target.
FUZZTIME ?= 30s
# BENCHTIME is passed to go test -benchtime by `make bench`.
BENCHTIME ?= 1s
# IDLE is how long `make bench` watches the agent idle in the booted image
# for its memory and CPU figures.
IDLE ?= 10m

# in_netns runs a command in a fresh network namespace where only loopback is
# up: nothing in it can reach the real IMDS or any other address. Each test
# binary also gets UTS and network namespaces of its own (go test -exec
# test_exec), so tests may set the kernel host name and change nftables
# without touching the machine's or each other's.
in_netns = unshare --net -- sh -c 'ip link set lo up && exec "$$@"' sh
test_exec = $(CURDIR)/scripts/test-exec.sh

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## install the Debian packages and pinned Go tools the tests and demo use
	@scripts/deps.sh

.PHONY: build
build: ## build bin/bootagent (this machine's), bin/linux_ARCH/bootagent for each of ARCHES (static, stamped), and the test stand-ins
	for a in $(ARCHES); do GOOS=linux GOARCH=$$a $(GO_BUILD) -o bin/linux_$$a/bootagent ./cmd/bootagent; done
	$(GO_BUILD) -o bin/bootagent ./cmd/bootagent
	go build -trimpath -o bin/chefclient-standin ./test/chefclient-standin
	go build -trimpath -o bin/knife-standin ./test/knife-standin
	install -m 0755 test/chefclient-ruby-standin/chefclient-ruby-standin bin/

.PHONY: man
man: ## render the man pages bootagent(8) and bootagent.yaml(5) into bin/man with go-md2man
	@scripts/man.sh bin/man

.PHONY: test
test: ARCHES := amd64 arm64
test: deps build deb rpm e2e-image ## install what is needed, then run every test (loopback-only network namespace)
	go mod download
	$(in_netns) env $(GO_TEST_ENV) BOOTAGENT_DIST=$(CURDIR)/dist BOOTAGENT_E2E_IMAGE=$(E2E_IMAGE) \
		go test -race -count=1 -timeout 20m -exec $(test_exec) ./...

.PHONY: e2e
e2e: ARCHES := amd64 arm64
e2e: deps build deb e2e-image ## only the boot test: the .deb in a real systemd (systemd-nspawn)
	$(in_netns) env $(GO_TEST_ENV) BOOTAGENT_DIST=$(CURDIR)/dist BOOTAGENT_E2E_IMAGE=$(E2E_IMAGE) \
		go test -count=1 -timeout 15m -v -exec $(test_exec) ./test/e2e/

# E2E_IMAGE is the Debian image the boot test copies for each run. It is
# built once with debootstrap (the only step that needs Debian's mirror, so
# it runs before the tests enter their namespace) and cached.
E2E_IMAGE := $(CURDIR)/.cache/e2e/bookworm
.PHONY: e2e-image
e2e-image: deps
	@scripts/e2e-image.sh $(E2E_IMAGE)

.PHONY: changelog
changelog:
	@mkdir -p bin && scripts/changelog.sh $(PKG_VERSION)-$(PKG_RELEASE) >bin/changelog.yaml

# The notices of Go and the modules the static binary is made of.
.PHONY: notices
notices:
	@mkdir -p bin && scripts/notices.sh >bin/THIRD-PARTY-NOTICES && gzip -9nkf bin/THIRD-PARTY-NOTICES

.PHONY: deb
deb: build man changelog notices ## build dist/bootagent_VERSION-1_ARCH.deb for each of ARCHES with nfpm
	@mkdir -p dist && rm -f dist/*.deb dist/SHA256SUMS* dist/*.[58]
	for a in $(ARCHES); do PKG_VERSION=$(PKG_VERSION) PKG_RELEASE=$(PKG_RELEASE) PKG_ARCH=$$a $(TOOLS)/nfpm pkg --packager deb --config packaging/nfpm.yaml --target dist/; done

.PHONY: rpm
rpm: build man changelog notices ## build dist/bootagent-VERSION-1.ARCH.rpm for each of ARCHES with nfpm
	@mkdir -p dist && rm -f dist/*.rpm dist/SHA256SUMS* dist/*.[58]
	for a in $(ARCHES); do PKG_VERSION=$(PKG_VERSION) PKG_RELEASE=$(PKG_RELEASE) PKG_ARCH=$$a $(TOOLS)/nfpm pkg --packager rpm --config packaging/nfpm.yaml --target dist/; done

.PHONY: release
release: deb rpm ## the packages of ARCHES, the man pages and SHA256SUMS, in dist/
	cp bin/man/bootagent.8 bin/man/bootagent.yaml.5 dist/
	@$(MAKE) --no-print-directory checksums

# checksums hashes what release put in dist/, again after the packages are
# signed (signing rewrites them).
.PHONY: checksums
checksums:
	cd dist && rm -f SHA256SUMS SHA256SUMS.asc && sha256sum -- *.deb *.rpm bootagent.8 bootagent.yaml.5 >SHA256SUMS.new && mv SHA256SUMS.new SHA256SUMS

.PHONY: demo
demo: deps build ## run a first boot against the AWS IMDS emulator and show the result
	@scripts/demo.sh

.PHONY: lint
lint: ## gofmt, go vet and golangci-lint
	@scripts/deps.sh lint
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: the files above need formatting"; exit 1; }
	go vet ./...
	$(TOOLS)/golangci-lint run ./...

.PHONY: docs
docs: ## render docs/phases.svg from docs/phases.dot (a test checks they agree)
	@scripts/deps.sh docs
	dot -Tsvg docs/phases.dot -o docs/phases.svg

.PHONY: fuzz
fuzz: deps ## run every fuzz target for FUZZTIME each
	@scripts/fuzz.sh $(FUZZTIME)

.PHONY: bench
bench: ARCHES := amd64 arm64
bench: deps build deb e2e-image ## benchmarks: decoding, registration, whole `once` runs, and a boot in the image (IDLE sets its idle period)
	go mod download
	$(in_netns) env $(GO_TEST_ENV) BOOTAGENT_DIST=$(CURDIR)/dist BOOTAGENT_E2E_IMAGE=$(E2E_IMAGE) BOOTAGENT_BENCH_IDLE=$(IDLE) \
		go test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) -timeout 60m -exec $(test_exec) ./... | tee bin/bench.txt
	@scripts/benchtable.sh bin/bench.txt

# BOOTS is how many times `make bench-boot` boots each variant.
BOOTS ?= 5
# BENCH_IMAGE is E2E_IMAGE with cloud-init and curl, for `make bench-boot`.
BENCH_IMAGE := $(CURDIR)/.cache/e2e/bookworm-bench

.PHONY: bench-boot
bench-boot: ARCHES := amd64 arm64
bench-boot: deps build deb ## boots side by side in systemd-nspawn: Debian's cloud-init, a shell floor, bootagent's .deb (BOOTS each, 5)
	@scripts/e2e-image.sh $(BENCH_IMAGE) cloud-init,curl,python3-cffi-backend
	$(in_netns) env $(GO_TEST_ENV) BOOTAGENT_DIST=$(CURDIR)/dist BOOTAGENT_BENCH_IMAGE=$(BENCH_IMAGE) BOOTAGENT_BENCH_BOOTS=$(BOOTS) \
		go test -run '^$$' -bench '^BenchmarkBootSideBySide$$' -benchtime 1x -timeout 60m -exec $(test_exec) ./test/e2e/ | tee bin/bench-boot.txt

# FLEET is how many agents `make bench-fleet` launches at once, FLEET_RATE the
# requests a second its throttled Chef server takes.
FLEET      ?= 500
FLEET_RATE ?= 50

.PHONY: bench-fleet
bench-fleet: deps build ## a scale-out storm: FLEET agents (500) at once against goiardi throttled to FLEET_RATE requests/s, drawn in bin/fleet-storm.png
	go mod download
	$(in_netns) env $(GO_TEST_ENV) \
		go test -count=1 -v -timeout 60m -exec $(test_exec) -run '^TestScaleOutStorm$$' ./test/fleet \
		-fleet.n=$(FLEET) -fleet.rate=$(FLEET_RATE) -fleet.plot=$(CURDIR)/bin/fleet-storm.png | tee bin/fleet.txt

.PHONY: clean
clean: ## remove build output (keeps the installed tools and the cached image)
	rm -rf bin dist
