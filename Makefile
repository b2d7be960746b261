# bootagent's build, test and demo entry points. `make help` lists them.
# Everything a target needs is installed by the target itself (scripts/deps.sh):
# Debian packages with apt-get, Go tools at pinned versions into .tools/bin.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

TOOLS   := $(CURDIR)/.tools/bin
VERSION := $(shell git describe --tags --always --dirty 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X main.version=$(VERSION)
GO_TEST_ENV := PATH="$(CURDIR)/bin:$(TOOLS):$$PATH" GOFLAGS=-mod=readonly GOPROXY=off

# FUZZTIME is how long `make fuzz` runs each fuzz target.
FUZZTIME ?= 30s
# BENCHTIME is passed to go test -benchtime by `make bench`.
BENCHTIME ?= 1s

# in_netns runs a command in a fresh network namespace where only loopback is
# up: nothing in it can reach the real IMDS or any other address. Each test
# binary also gets its own UTS namespace (go test -exec), so tests may set the
# kernel host name without touching the machine's or each other's.
in_netns = unshare --net -- sh -c 'ip link set lo up && exec "$$@"' sh

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## install the Debian packages and pinned Go tools the tests and demo use
	@scripts/deps.sh

.PHONY: build
build: ## build bin/bootagent, version stamped from git describe, and the test stand-in
	go build -trimpath -ldflags "$(LDFLAGS)" -o bin/bootagent ./cmd/bootagent
	go build -trimpath -o bin/chefclient-standin ./test/chefclient-standin
	go build -trimpath -o bin/knife-standin ./test/knife-standin

.PHONY: test
test: deps build ## install what is needed, then run every test (loopback-only network namespace)
	go mod download
	$(in_netns) env $(GO_TEST_ENV) go test -race -count=1 -exec "unshare --uts --" ./...

.PHONY: demo
demo: deps build ## run a first boot against the AWS IMDS emulator and show the result
	@scripts/demo.sh

.PHONY: lint
lint: ## gofmt, go vet and golangci-lint
	@scripts/deps.sh lint
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: the files above need formatting"; exit 1; }
	go vet ./...
	$(TOOLS)/golangci-lint run ./...

.PHONY: fuzz
fuzz: deps ## run every fuzz target for FUZZTIME each
	@scripts/fuzz.sh $(FUZZTIME)

.PHONY: bench
bench: deps build ## benchmarks: user-data decoding, and a whole `bootagent once` against the emulator
	go mod download
	$(in_netns) env $(GO_TEST_ENV) go test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) -exec "unshare --uts --" ./... | tee bin/bench.txt
	@scripts/benchtable.sh bin/bench.txt

.PHONY: clean
clean: ## remove build output (keeps the installed tools)
	rm -rf bin dist
