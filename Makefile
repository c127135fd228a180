# Two commands from a fresh machine: `make demo` and `make test`. `make setup` is the shared step.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mtconvert-installed

.PHONY: setup browser demo test test-all fixtures bench clean

setup: $(STAMP) browser

# Headless Chromium for the HTML report's browser test (tests/converter/test_html.py): Debian's
# package when it is missing and we are root with apt-get; otherwise nothing (the test says why
# it is skipped).
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 \
	  || { echo "installing chromium (apt-get) for the HTML report's browser test"; \
	       apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
	  || echo "chromium could not be installed: tests/converter/test_html.py will skip its browser tests"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	# onnx2torch (coreml from ONNX) declares torchvision, whose registry wheels need CUDA torch
	# and, broken, break transformers' imports; mtconvert does without it (see onnx_bridge.py)
	$(PY) -m pip install -q -c constraints.txt --no-deps onnx2torch
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mtconvert fixtures/bert_encoder.onnx --out build/demo --report-json build/demo/report.json; \
	  rc=$$?; echo "mtconvert exit code: $$rc"; exit $$rc

# pytest exits 5 when it collects no test: that is a failure here too (any non-zero exit fails).
# Two pytest workers, a test file each (its module-scoped conversions stay in one worker); the
# `sweep` tests (the same end-to-end check over every fixture, family or target) are left to
# `make test-all`.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile
test: setup
	$(PYTEST) -m "not sweep" tests

test-all: setup
	$(PYTEST) tests

fixtures: setup
	$(PY) fixtures/make_fixtures.py

bench: setup
	$(PY) benchmarks/bench_foundation.py

clean:
	rm -rf build .pytest_cache
