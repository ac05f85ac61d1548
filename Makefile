# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; install it before the project so pip never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test venv browser sample-data bench clean

$(BIN)/aeflow: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(BIN)/aeflow

venv: $(BIN)/aeflow

demo: venv
	$(BIN)/aeflow demo

test: venv browser
	$(BIN)/python -m pytest -q

# The UI test (tests/e2e) drives Debian's chromium + chromium-driver. Installed here when
# missing and we are root with apt (as in CI); otherwise that one test is skipped with a reason.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver for the UI test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install chromium; the UI test will be skipped"; \
	else echo "note: chromium/chromedriver missing and not root: the UI test will be skipped"; fi

sample-data: venv
	$(BIN)/aeflow sample-data

bench: venv
	$(BIN)/python -m benchmarks.train_overhead
	$(BIN)/python -m benchmarks.preprocess
	$(BIN)/python -m benchmarks.overhead
	$(BIN)/python -m benchmarks.images
	$(BIN)/python -m benchmarks.detect_speed

clean:
	rm -rf $(VENV) artifacts .pytest_cache
