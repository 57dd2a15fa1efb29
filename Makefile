PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv browser demo test docs bench clean

# torch/torchvision are pinned here (not in pyproject) to the builds that work together on a fresh machine.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/nha demo --out demo_out
	HF_HUB_OFFLINE=1 $(VENV)/bin/nha benchmark --quick --out demo_out/benchmark
	HF_HUB_OFFLINE=1 $(VENV)/bin/nha report --run demo_out/benchmark --out demo_out/report

# The report's browser tests drive the system Chromium (never a downloaded browser): install it when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else echo "chromium and chromium-driver are missing: run 'sudo apt-get install chromium chromium-driver'" >&2; exit 2; fi; }

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 NHA_STRICT_SKIPS=1 $(PY) -m pytest -q tests

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/decomposition_speed.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/omp_speed.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/harness_benchmark.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/stats_throughput.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/vit_decomposition_speed.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/segmentation_scenes.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/shift_scenes.py

clean:
	rm -rf $(VENV) demo_out site
