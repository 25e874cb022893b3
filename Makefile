# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv once and reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MOEKIT := $(VENV)/bin/moekit
STAMP := $(VENV)/.moekit-installed
DEMO_MODEL := demo/model
DEMO_DATA := prose,code,math,german,french,russian,japanese,dialogue
OUT := out

.PHONY: setup demo test chromium clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on local disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled demo model: what it is, its routing traced on held-out text of every domain, the
# analysis report, a cache what-if, and generation with experts offloaded under a memory budget.
demo: setup
	$(MOEKIT) info $(DEMO_MODEL)
	$(MOEKIT) trace $(DEMO_MODEL) --data $(DEMO_DATA) --out $(OUT)/demo-trace --max-tokens 65536 --activation-stats --resume
	$(MOEKIT) analyze $(OUT)/demo-trace --out $(OUT)/demo-report.html
	$(MOEKIT) simulate $(OUT)/demo-trace --policy lru,lfu,lfru,score,belady --capacity 1x,2x,4x
	$(MOEKIT) run $(DEMO_MODEL) --budget 6MiB --prompt "def fibonacci(n):" --max-new-tokens 40 --stats
	@echo "report: $(OUT)/demo-report.html"

# The report test renders in Debian's headless Chromium; install it when missing (it skips if that is impossible).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the report test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: the browser test will be skipped"; }

test: setup chromium
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
