# kmsd: `make run` starts a development daemon, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: .venv run test lint bench clean install

.venv: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ./client -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p var
	$(VENV)/bin/kmsd serve --dev --socket ./var/kmsd.sock --listen 127.0.0.1:8000 --database sqlite:///var/kmsd.db

test: lint
	$(VENV)/bin/python -m pytest -q

# ruff and mypy (strict on kmsd/ and client/), configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	bench/run

# As root on a Debian host with systemd: the service, its users, config and root key.
install:
	systemd/install.sh

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
