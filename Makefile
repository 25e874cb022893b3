# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv once and reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MOEKIT := $(VENV)/bin/moekit
STAMP := $(VENV)/.moekit-installed
DEMO_MODEL := demo/model
DEMO_DATA := prose,code,math,german,french,russian,japanese,dialogue
DEMO_PREDICTOR := demo/predictor.safetensors
OUT := out
LOCK := requirements.lock
LOCK_VENV := .lock-venv

.PHONY: setup demo demo-predictor test chromium clean lock

# Exact versions from the committed lock (the ones the suite passed with), then moekit itself without resolving anything.
# torch is locked to the 2.13.0 CPU build, which pip takes from local disk (an unpinned torch pulls a multi-GB CUDA
# build). pip, setuptools and wheel are locked too, so the editable install needs no build isolation.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled demo model: what it is, its routing traced on held-out text of every domain (with the
# shipped routing predictor's forecasts), the analysis report, a cache what-if, and generation with experts offloaded
# under a memory budget, with LRU and with the predictive cache.
demo: setup
	$(MOEKIT) info $(DEMO_MODEL)
	@# a demo trace from before the predictor cannot be resumed with it (its options differ): record it again
	@if [ -f $(OUT)/demo-trace/manifest.json ] && ! grep -q '"predictor": {' $(OUT)/demo-trace/manifest.json; then \
		echo "$(OUT)/demo-trace was recorded without the demo predictor: recording it again"; rm -rf $(OUT)/demo-trace; fi
	$(MOEKIT) trace $(DEMO_MODEL) --data $(DEMO_DATA) --out $(OUT)/demo-trace --max-tokens 65536 --activation-stats --predictor $(DEMO_PREDICTOR) --resume
	$(MOEKIT) analyze $(OUT)/demo-trace --out $(OUT)/demo-report.html
	$(MOEKIT) simulate $(OUT)/demo-trace --policy lru,lfu,lfru,score,predictive,belady --capacity 1x,2x,4x
	$(MOEKIT) run $(DEMO_MODEL) --budget 6MiB --prompt "def fibonacci(n):" --max-new-tokens 40 --stats
	$(MOEKIT) run $(DEMO_MODEL) --budget 6MiB --prompt "def fibonacci(n):" --max-new-tokens 40 --stats --policy predictive --predictor $(DEMO_PREDICTOR)
	$(PY) demo/serve_demo.py
	@echo "report: $(OUT)/demo-report.html"

# How $(DEMO_PREDICTOR) was trained: a float32 trace of every domain's held-out text after its first 40,960 tokens
# (the demo trace and the benchmarks evaluate on the first ones), then the predictor (about 10 minutes on 2 cores).
demo-predictor: setup
	$(MOEKIT) trace $(DEMO_MODEL) --data $(DEMO_DATA) --skip-tokens 327680 --seq-len 256 --dtype float32 --out $(OUT)/predictor-trace --resume
	$(MOEKIT) predictor train $(OUT)/predictor-trace --out $(DEMO_PREDICTOR)

# The report test renders in Debian's headless Chromium; install it when missing (it skips if that is impossible).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the report test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: the browser test will be skipped"; }

test: setup chromium
	$(PY) -m pytest -q

# Refresh the lock: resolve pyproject.toml's ranges afresh in a throw-away venv and freeze what was installed. Run
# `make test` after it and commit requirements.lock only when the suite passes.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[dev,bench,c3po]'
	{ echo "# moekit's locked environment: written by \`make lock\`, installed by \`make setup\` (pip install -r)."; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())'), $$(date -u +%F)"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^moekit'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK); now run make test (it rebuilds .venv from the new lock)"

clean:
	rm -rf $(VENV) $(OUT) $(LOCK_VENV)
