# stargz-store: make deps | test | test-podman5 | podman5-chroot | demo | bench | fuzz | lint | install | uninstall
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# What the store needs on a node (make install), then what the tests, the demo and the benchmarks add
# (systemd: systemd-analyze, which checks the installed unit).
RUNTIME_APT_PACKAGES := python3 python3-venv python3-pip fuse3 ca-certificates
APT_PACKAGES := $(RUNTIME_APT_PACKAGES) podman runc docker-registry skopeo iproute2 busybox-static curl uidmap zstd openssl strace tar gzip debootstrap systemd
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 300

.PHONY: deps apt-deps runtime-deps py-deps test test-podman5 podman5-chroot demo bench fuzz lint clean install uninstall

# make install / uninstall (as root): see README.md, "Install". DESTDIR stages the files for a package.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
DOCDIR ?= $(PREFIX)/share/doc/stargz-store
OPTDIR ?= /opt/stargz-store
SYSCONFDIR ?= /etc
CONFDIR ?= $(SYSCONFDIR)/stargz-store
UNITDIR ?= $(SYSCONFDIR)/systemd/system
STATEDIR ?= /var/lib/stargz-store
# The service's interpreter: the system's, never one under a home directory (pyenv), which `make deps` may use.
SYSTEM_PYTHON ?= /usr/bin/python3
DESTDIR ?=
PURGE ?=
PIP_INSTALL_FLAGS ?=
INSTALL_VARS = OPTDIR='$(OPTDIR)' BINDIR='$(BINDIR)' UNITDIR='$(UNITDIR)' CONFDIR='$(CONFDIR)' DOCDIR='$(DOCDIR)' \
  STATEDIR='$(STATEDIR)' SYSTEM_PYTHON='$(SYSTEM_PYTHON)' DESTDIR='$(DESTDIR)' PURGE='$(PURGE)' \
  PIP_INSTALL_FLAGS='$(PIP_INSTALL_FLAGS)'

deps: apt-deps py-deps

# Installs only what is missing, so a second run is quick and offline-safe.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

apt-deps:
	$(call apt_install,$(APT_PACKAGES))

runtime-deps:
	$(call apt_install,$(RUNTIME_APT_PACKAGES))

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

# The program in its own venv (OPTDIR), links in BINDIR, the unit, config.toml if absent, the docs.
# A staged install (DESTDIR) installs no Debian package.
install: $(if $(DESTDIR),,runtime-deps)
	$(INSTALL_VARS) contrib/install.sh install

# Keeps $(CONFDIR)/config.toml unless PURGE=1; refuses while the unit is enabled or the store mounted.
uninstall:
	$(INSTALL_VARS) contrib/install.sh uninstall

lint: py-deps
	$(PY) -m compileall -q stargz_store tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
