# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; install it before the project so pip never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test venv browser postgres validators sample-data bench clean

$(BIN)/aeflow: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,platform]"
	touch $(BIN)/aeflow

venv: $(BIN)/aeflow

demo: venv
	$(BIN)/aeflow demo

test: venv browser postgres validators
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

# `aeflow platform up` (and its tests) runs a private PostgreSQL cluster from Debian's server programs.
# Installed here when missing and we are root with apt (as in CI); otherwise the platform tests are skipped.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing postgresql for the platform tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| echo "warning: could not install postgresql; the platform tests will be skipped"; \
	else echo "note: PostgreSQL's server programs missing and not root: the platform tests will be skipped"; fi

# The DaskCluster in infra/k8s is checked against the CRD that the dask-kubernetes wheel ships; only the
# wheel is fetched (installing it would pull the Kubernetes clients and move python-dateutil).
DASK_K8S_WHEEL_DIR := $(VENV)/validators
validators: venv
	@ls $(DASK_K8S_WHEEL_DIR)/dask_kubernetes-*.whl >/dev/null 2>&1 || \
		$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d $(DASK_K8S_WHEEL_DIR) "dask-kubernetes>=2025.1" \
		|| echo "warning: could not fetch the dask-kubernetes wheel; its CRD check will be skipped"

sample-data: venv
	$(BIN)/aeflow sample-data

bench: venv
	$(BIN)/python -m benchmarks.train_overhead
	$(BIN)/python -m benchmarks.preprocess
	$(BIN)/python -m benchmarks.overhead
	$(BIN)/python -m benchmarks.images
	$(BIN)/python -m benchmarks.detect_speed
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.index_scale
	$(BIN)/python -m benchmarks.codec_tiles --write
	$(BIN)/python -m benchmarks.metrics_speed

clean:
	rm -rf $(VENV) artifacts .pytest_cache
