# Sourced by the GPU box's check scripts (gpu_checks.sh, gpu_learner_checks.sh): the run's environment,
# and the machine's description at the top of $OUT/stack.txt.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# libEGL.so.1 / libGLdispatch come with the bundle (glvnd dispatchers; the image has only the NVIDIA vendor libraries)
if [ -d /opt/stash/dirs/gl ]; then export LD_LIBRARY_PATH=/opt/stash/dirs/gl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
PY=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  echo "cores: $(nproc)"
  # physical cores against hardware threads: env workers' physics scales with the former
  lscpu 2>/dev/null | grep -E "^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|CPU MHz|L3 cache)" || true
} 2>&1 | tee "$OUT/stack.txt"
