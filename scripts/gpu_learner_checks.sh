#!/usr/bin/env bash
# The GPU box's learner and weight-sync run (docs/performance.md "Learner"): each check is one script
# with its own time limit, so one that fails or runs out of memory leaves the others' figures.
#
#   CHECKS=learner,devices bash scripts/gpu_learner_checks.sh   # from the repository root, bundle installed
#
# Checks (CHECKS, comma-separated, in this order; default all):
#   learner   scripts/bench_learner.py, configs/oft7b.yaml: full-parameter forward+backward, a full-parameter
#             GRPO step with the optimizer on the GPU (an H200's memory), then a LoRA GRPO mini-batch and
#             the merge (a process each: an OOM in one cannot take the others with it)
#   devices   scripts/check_learner_devices.py: the demo's policy, a few GRPO steps on cpu and on cuda
#   step      scripts/bench_grpo_step.py, configs/gpu_1x16.yaml + LoRA: whole GRPO steps on LIBERO-Spatial
#   step_overlap  the same with rollout.max_policy_lag=1: rollout beside the learner's update
#   sync      scripts/bench_weight_sync.py: the 7B-shaped policy's weights, object_store against cuda_ipc
#   demo_step scripts/bench_grpo_step.py, configs/demo.yaml with the policy on the GPU (seconds per RL step)
# Writes under $OUT (default runs/gpu_learner_checks): stack.txt, CHECK.log and CHECK.json per check.
set -uo pipefail
OUT=${OUT:-runs/gpu_learner_checks}
CHECKS=${CHECKS:-learner,devices,step,step_overlap,sync,demo_step}
LIMIT_S=${LIMIT_S:-300}  # per check; at 7B the step check's roles alone take ~3 min to start: give it LIMIT_S=560
# STEP_ENV: env overrides for the step check, e.g. the built-in tabletop suite where LIBERO is not installed:
#   STEP_ENV="env.backend=tabletop env.suite=tabletop env.image_size=224 env.num_steps_wait=0"
source "$(dirname "$0")/gpu_env.sh"
{
  $PY -c "import torch, transformers, peft, deepspeed; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)"
} 2>&1 | tee -a "$OUT/stack.txt"

status=0
check() {  # check NAME COMMAND...: run it under the time limit, log to $OUT/NAME.log
  local name=$1; shift
  case ",$CHECKS," in *",$name,"*) ;; *) return 0 ;; esac
  echo "=== $name: $*" | tee -a "$OUT/$name.log"
  local t0=$SECONDS rc=0
  timeout --signal=TERM --kill-after=15 "$LIMIT_S" "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  ray stop --force >/dev/null 2>&1 || true  # a check cut short leaves no cluster for the next
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  grep -v -e "INFO" -e "^\s*$" "$OUT/$name.log" | tail -n 25
  [ "$rc" -eq 0 ] || status=$rc
}

check learner $PY scripts/bench_learner.py --config configs/oft7b.yaml --modes full_fwd_bwd --samples 16 \
  --iters 3 --warmup 1 --out "$OUT/learner_full.json" learner.micro_batch_chunks=8
# twice the micro-batch: larger matmuls, ~17 GiB more activations (a process of its own: an OOM ends only it)
check learner $PY scripts/bench_learner.py --config configs/oft7b.yaml --modes full_fwd_bwd --samples 32 \
  --iters 3 --warmup 1 --out "$OUT/learner_full16.json" learner.micro_batch_chunks=16
# every parameter trained on the one GPU, the fp32 master weights and Adam's state beside the model (~16 bytes a
# weight, 112 GiB at 7.54 B): an H200 holds it (kind nvidia-h200), an 80 GB card runs out of memory. The same with
# learner.offload_optimizer (--modes full_offload) needs ~112 GiB of host memory: more than the 128 GB box has free
check learner $PY scripts/bench_learner.py --config configs/oft7b.yaml --modes full --samples 16 \
  --iters 2 --warmup 1 --out "$OUT/learner_full_step.json" learner.micro_batch_chunks=8 learner.gradient_checkpointing=true
check learner $PY scripts/bench_learner.py --config configs/oft7b.yaml --modes lora,merge --samples 64 \
  --iters 2 --warmup 1 --out "$OUT/learner_lora.json" learner.micro_batch_chunks=16 learner.lora.rank=32
check devices $PY scripts/check_learner_devices.py --config configs/demo.yaml --devices cpu,cuda --steps 4 \
  --out "$OUT/devices.json" policy.unnorm_key=tabletop_pretrain
# 6 groups x 8 = 48 episodes: one per env slot of the config
check step $PY scripts/bench_grpo_step.py --config configs/gpu_1x16.yaml --steps 2 --out "$OUT/step.json" \
  learner.lora.rank=32 learner.weight_sync=cuda_ipc learner.mini_batch_size=16 learner.micro_batch_chunks=16 \
  rollout.groups_per_batch=6 env.max_steps=128 learner.gradient_checkpointing=false ${STEP_ENV:-}
# the step check's random 7B policy, when it saved one (the same shape): saves writing 15 GB again
saved=runs/gpu_1x16/bench/random_policy
reuse() { [ -e $saved/config.json ] && echo policy.path=$saved; }
# the same steps with the env slots rolling out while the learner trains (max_policy_lag 1): the paper's
# batch from the steady state of steps 2-4
check step_overlap $PY scripts/bench_grpo_step.py --config configs/gpu_1x16.yaml --steps 4 --out "$OUT/step_overlap.json" \
  learner.lora.rank=32 learner.weight_sync=cuda_ipc learner.mini_batch_size=16 learner.micro_batch_chunks=16 \
  rollout.groups_per_batch=6 env.max_steps=128 learner.gradient_checkpointing=false rollout.max_policy_lag=1 \
  $(reuse) ${STEP_ENV:-}
# object_store first: its syncs include the store copy (~30 s at 7B), so it is the one a short LIMIT_S cuts
check sync $PY scripts/bench_weight_sync.py configs/oft7b.yaml --replicas 1 --syncs ${SYNCS:-3} \
  --backends object_store,cuda_ipc --json "$OUT/sync.json" learner.lora.rank=32 cluster.replica_gpus=0.5 \
  cluster.learner_gpus=0.5 cluster.num_env_workers=1 cluster.envs_per_worker=1 $(reuse)
check demo_step $PY scripts/bench_grpo_step.py --config configs/demo.yaml --steps 4 --out "$OUT/demo_step.json" \
  policy.unnorm_key=tabletop_pretrain "learner.loss_terms={}" policy.device=cuda cluster.replica_gpus=0.5 \
  cluster.learner_gpus=0.5 cluster.comm_backend=nccl cluster.num_env_workers=12 cluster.env_worker_cpus=1
exit "$status"
