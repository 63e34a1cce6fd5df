#!/usr/bin/env bash
# The GPU box's benchmark run: scripts/bench_gpu.py over all four phases (sim, inference, ours, lockstep)
# with configs/gpu_1x16.yaml, in one command that ends inside 10 minutes (a device call's limit).
#
#   bash scripts/gpu_checks.sh        # from the repository root, once the wheel bundle is installed
#
# Writes under $OUT (default runs/gpu_checks): stack.txt (machine and packages), bench_gpu.log and
# bench_gpu.json (rewritten after every phase, so a run cut short keeps what it measured), and
# ray_logs.tar.gz when the benchmark fails.
# Phase bounds: episodes of ENV_STEPS steps (a random policy never succeeds: every episode runs that
# long), one round of one episode per env slot for sim, ours and lockstep.
set -euo pipefail
OUT=${OUT:-runs/gpu_checks}
ENV_STEPS=${ENV_STEPS:-256}
LIMIT_S=${LIMIT_S:-520}  # the benchmark is stopped here (its JSON keeps the phases done): the script ends inside 10 minutes
PHASES=${PHASES:-sim,inference,ours,lockstep}
# EXTRA: more options and key=value overrides for a variant run, e.g. the regional torch.compile in the
# inference phase and the replica: EXTRA="--compile policy.compile=true"
source "$(dirname "$0")/gpu_env.sh"
{
  $PY -c "import sys, torch, transformers, ray, mujoco, numpy; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'ray', ray.__version__, 'mujoco', \
mujoco.__version__, 'numpy', numpy.__version__)"
  # LIBERO offline: writes its config.yaml, verifies the 864 asset files once (the stamp spares every
  # env worker the hashing), probes the GL backend (egl expected) and imports libero
  $PY -c "from env_workers.libero.bootstrap import ensure_libero; print('libero:', ensure_libero())"
} 2>&1 | tee -a "$OUT/stack.txt"

status=0
timeout --signal=TERM --kill-after=15 "$LIMIT_S" $PY scripts/bench_gpu.py --config configs/gpu_1x16.yaml \
  --phases "$PHASES" --out "$OUT/bench_gpu.json" \
  --batches 1,8,32,64 --iters 10 --warmup 2 --latency-iters 30 \
  --warmup-seconds 5 --rounds 1 "env.max_steps=$ENV_STEPS" ${EXTRA:-} \
  2>&1 | tee "$OUT/bench_gpu.log" || status=$?
if [ "$status" -ne 0 ]; then
  echo "bench_gpu.py failed (exit $status); Ray's logs in $OUT/ray_logs.tar.gz" | tee -a "$OUT/bench_gpu.log"
  logs=$(ls -d /tmp/ray/session_latest/logs 2>/dev/null || true)
  if [ -n "$logs" ]; then
    tar -czf "$OUT/ray_logs.tar.gz" -C "$logs" . 2>/dev/null || true
    # what comes back from the device is at most 16 MiB a file
    [ "$(stat -c %s "$OUT/ray_logs.tar.gz")" -le $((15 * 1024 * 1024)) ] || rm -f "$OUT/ray_logs.tar.gz"
  fi
fi
exit "$status"
