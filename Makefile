# Two commands on a fresh machine:  `make demo` (the smoke job end to end)  and  `make test`.
# Each installs what it needs first (a venv in .venv; ffmpeg for the tests' derived videos, chromium
# for the browser tests of the HTML reports).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED := 1

.PHONY: install system-deps demo test test-unit lint bench-converters clean

install: $(VENV)/.installed

# torch goes in first and is then pinned, so no other package can swap it for another build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip freeze | grep -iE '^(torch|torchvision)==' > $(VENV)/torch-constraints.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraints.txt -e '.[dev,report]'
	touch $@

system-deps:
	@command -v ffmpeg >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null; \
	  else echo "ffmpeg is needed by the tests: sudo apt-get install ffmpeg" >&2; exit 1; fi; }
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium (headless, for the report tests) is needed: sudo apt-get install chromium" >&2; \
	  exit 1; fi; }

demo: install
	$(PY) -m pipeline run jobs/smoke.yaml

test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check tokconv pipeline tests bench

bench-converters: install
	$(PY) bench/converters.py cost $(ARGS)

clean:
	rm -rf runs/smoke .pytest_cache
