# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing
# and installs the project with its dev extras first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit protos bench clean sysdeps

# A venv left without pip (python3-venv was missing when it was made: Debian's venv made
# .venv/bin/python, then failed) is made again, not used as it is for good.
$(STAMP): pyproject.toml
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	@echo "installing sidemesh and its dev tools into $(VENV) ..."
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sidemesh demo

test: $(STAMP) sysdeps lint typecheck unit

# The e2e tests build pods from network namespaces and need iptables and iproute2; the HTTP/2
# conformance test drives the sidecars with h2load (nghttp2-client). As root on Debian they are
# installed here; otherwise those tests skip and say why.
SYSDEPS := iptables iproute2 curl util-linux mount nghttp2-client
sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! (command -v iptables && command -v ip && command -v curl && command -v setpriv && command -v h2load) >/dev/null; then \
	  echo "installing $(SYSDEPS) for the e2e tests (apt-get) ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS) >/dev/null) \
	    || echo "could not install $(SYSDEPS): the e2e tests will skip"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# tests/ on two workers, each test file whole on one (the suite waits on sockets and timers more
# than it computes: about half the time); then e2e/ alone, one file after another (its files build
# network namespaces and check the host is left as it was).
unit: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile tests
	$(BIN)/pytest e2e

protos: $(STAMP)
	$(BIN)/python -m sidemesh.api.generate

# Every benchmark (bench/all.py: CA, injector, controller, L4; HTTP and tracing once they exist),
# then bench/results/REPORT.md, its plots and the README's table (`python -m bench.report` alone
# redraws them from the results already there).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@command -v wrk >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing wrk for bench.l4 (apt-get) ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null) \
	    || echo "could not install wrk: bench.l4 skips its request/s runs"; \
	  else echo "wrk not found (apt-get install wrk): bench.l4 skips its request/s runs"; fi; }
	$(BIN)/python -m bench.all

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
