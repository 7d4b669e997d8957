# stargz-store: make deps | test | test-podman5 | podman5-chroot | demo | bench | fuzz | lint
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := podman runc docker-registry skopeo fuse3 libfuse3-3 iproute2 busybox-static curl ca-certificates python3-venv uidmap zstd openssl strace tar gzip debootstrap
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 300

.PHONY: deps apt-deps py-deps test test-podman5 podman5-chroot demo bench fuzz lint clean

deps: apt-deps py-deps

# Installs only what is missing, so a second run is quick and offline-safe.
apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

py-deps: $(VENV)/.installed

# Both podman lanes: the host's 4.3.1 and Podman 5 in a Debian 13 chroot (built on first use, cached
# in /var/cache/stargz-store-ci/podman5 or $$STARGZ_PODMAN5_CACHE; see stargz_store/localenv/podman5.py).
test: deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Only the Podman 5 lane (the tests marked podman5), e.g. `make test-podman5 PYTEST_ARGS=tests/e2e`.
test-podman5: deps podman5-chroot
	$(PY) -m pytest -q -m podman5 $(PYTEST_ARGS)

# The cached Podman 5 chroot: built with debootstrap if missing or incomplete (~1 min, ~420 MB), else nothing.
podman5-chroot: deps
	$(PY) -m stargz_store.localenv.podman5 build

demo: deps
	$(PY) contrib/demo.py $(DEMO_ARGS)

bench: deps
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m benchmarks $(BENCH_ARGS)

# Coverage-guided fuzzing of the format parsers (atheris, libFuzzer) for FUZZ_SECONDS; not part of
# `make test` nor of CI. A finding is written to fuzz-artifacts/: see tests/fuzz/fuzz_formats.py.
fuzz: py-deps
	$(PY) -m pip install -q -e '.[test,fuzz]'
	$(PY) -m tests.fuzz.fuzz_formats -max_total_time=$(FUZZ_SECONDS) $(FUZZ_ARGS)

lint: py-deps
	$(PY) -m compileall -q stargz_store tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
