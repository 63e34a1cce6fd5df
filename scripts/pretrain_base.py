"""Pretrain the tabletop base policy on the disjoint "tabletop_pretrain" suite (the analogue of a VLA's
robot-data pretraining before one-demo SFT; docs/demo.md says why and what it changes).

Scripted experts record DEMOS_PER_TASK successful episodes per pretraining task (one process per
task), then plain-torch SFT with the pipeline's own samples, augmentation and loss (learner.sft_data,
learner.engine.sft_batch_loss) trains the architecture of CONFIG's `policy` section. Plain torch rather than
the DeepSpeed learner group because this is built once, on a GPU when there is one (8000 steps took
~4 min on an H200; on 2 CPU cores it would take hours); the result is the folder `make demo` loads
(policy.path), saved with only the pretraining suite's action statistics.

usage: python scripts/pretrain_base.py [--out DIR] [--config YAML] [--demos-per-task N] [--steps N]
                                       [--batch-size N] [--lr LR] [--seconds S] [--init BASE]
                                       [--dtype bfloat16|float32] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config_loading import load_config  # noqa: E402
from env_workers.demos import dataset_statistics, record_demos  # noqa: E402
from env_workers.factory import env_scaled_action_dims, env_scene_shift, make_env  # noqa: E402
from env_workers.tabletop.tasks import EXPERT_MAX_STEPS, PRETRAIN_SUITE, suite_tasks  # noqa: E402
from learner.engine import sft_batch_loss  # noqa: E402
from learner.sft_data import build_sft_samples, sft_batch  # noqa: E402
from policy.checkpoint import DTYPES, build_policy, load_policy, save_policy, upscale_images  # noqa: E402


def parse(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="policy/pretrained/tabletop_base")
    ap.add_argument("--config", default="configs/demo.yaml", help="its policy and env sections set the architecture and images")
    ap.add_argument("--demos-per-task", type=int, default=100)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak; cosine decay to a tenth of it")
    ap.add_argument("--seconds", type=float, default=None,
                    help="wall budget for the whole run: fewer than --steps steps if those would not fit in 90 %% of it "
                         "(speed measured over 100 steps after 20 warm-up steps; the rest is for saving)")
    ap.add_argument("--init", default=None,
                    help="continue from this base folder (its weights and action statistics) instead of a fresh policy")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="of the saved weights")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = ap.parse_args(argv)
    overrides = [f"env.suite={PRETRAIN_SUITE}", f"env.max_steps={EXPERT_MAX_STEPS}", "env.task_max_steps={}",
                 f"env.init_states.num_train={max(2 * args.demos_per_task, 50)}", *args.overrides]
    return args, load_config(args.config, overrides)


WARMUP_STEPS = 20  # not timed for --seconds


def _record(job) -> list:
    env_cfg, task, n = job
    torch.set_num_threads(1)
    env = make_env(env_cfg)
    try:
        return record_demos(env, [task], n)
    finally:
        env.close()


def _upscale_factor(init_arch, policy_cfg, init: str) -> int:
    """How many times larger the config's images are than the --init base's, at the same patch grid
    (1 = the same): a base pretrained at 64 px continues at 128 px with its patch kernels spread
    over 2 x 2 pixels (policy.checkpoint.upscale_images) instead of starting over."""
    factor = policy_cfg.image_size // init_arch.image_size
    if (factor < 1 or init_arch.image_size * factor != policy_cfg.image_size
            or init_arch.patch_size * factor != policy_cfg.patch_size):
        raise ValueError(f"--init {init}: its {init_arch.image_size} px images in {init_arch.patch_size} px patches are not "
                         f"the config's policy.image_size={policy_cfg.image_size} / policy.patch_size={policy_cfg.patch_size} "
                         f"scaled by one whole factor")
    return factor


def pretrain(args, cfg, log=print) -> dict:
    start = time.time()
    tasks = cfg.env.tasks or suite_tasks(cfg.env.suite)
    with Pool(max(1, min(len(tasks), os.cpu_count() or 1))) as pool:
        demos = [d for ds in pool.map(_record, [(cfg.env, t, args.demos_per_task) for t in tasks]) for d in ds]
    log(f"{len(demos)} expert demos over {len(tasks)} tasks ({time.time() - start:.0f}s)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.init:  # its statistics, not these demos': the tokens it learnt stay the same actions
        policy = load_policy(args.init, unnorm_key=PRETRAIN_SUITE)
        if list(policy.norm_stats) != [PRETRAIN_SUITE]:
            raise ValueError(f"--init {args.init}: not a {PRETRAIN_SUITE} base (its statistics: {sorted(policy.norm_stats)})")
        policy = upscale_images(policy, _upscale_factor(policy.model.config, cfg.policy, args.init))
    else:
        stats = {PRETRAIN_SUITE: dataset_statistics(demos, scaled_dims=env_scaled_action_dims(cfg.env))}
        policy = build_policy(cfg.policy.model_copy(update={"unnorm_key": PRETRAIN_SUITE, "path": None}), stats, seed=cfg.seed)
    policy.model.to(device)
    images, instructions, chunks, proprio = build_sft_samples(demos, cfg.policy.action_chunk)
    proprio = proprio if policy.uses_proprio else None
    scene = env_scene_shift(cfg.env) if cfg.sft.shift_moves_labels else None
    rng = np.random.default_rng(cfg.seed)
    params = list(policy.model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total = [args.steps]  # cosine from lr to lr/10 over the steps that will run
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total[0]) / total[0])))
    losses, t0, step = [], time.time(), 0
    while step < total[0]:
        idx = rng.choice(len(images), size=args.batch_size)
        batch_images, tokens, batch_proprio = sft_batch(images, chunks, proprio, idx, cfg.sft.shift_augment_px, scene,
                                                        policy.stats, policy.action_tokenizer, rng)
        loss = sft_batch_loss(policy, batch_images, [instructions[i] for i in idx], tokens, batch_proprio)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.learner.grad_clip)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step == WARMUP_STEPS - 1:
            t_warm = time.time()
        if args.seconds and step == WARMUP_STEPS + 99:  # speed after warm-up: on an H100 the first 100 steps
            per_step = (time.time() - t_warm) / 100   # (CUDA start-up included) averaged 1.6x the later ones
            total[0] = max(step + 1, min(args.steps, step + 1 + int((start + 0.9 * args.seconds - time.time()) / per_step)))
            log(f"  {per_step * 1e3:.0f} ms per step: {total[0]} steps fit in --seconds {args.seconds:.0f}")
        step += 1
        if step % max(1, total[0] // 16) == 0:
            log(f"  step {step}/{total[0]}  loss {np.mean(losses[-50:]):.4f}  ({time.time() - t0:.0f}s)")
    policy.model.to("cpu", DTYPES[args.dtype])
    out = save_policy(policy, args.out)
    summary = {"suite": PRETRAIN_SUITE, "tasks": tasks, "demos": len(demos), "samples": len(images),
               "steps": total[0], "batch_size": args.batch_size, "lr": args.lr, "final_loss": float(np.mean(losses[-50:])),
               "seconds": time.time() - start, "device": str(device), "config": args.config, "dtype": args.dtype,
               "init": args.init, "overrides": list(args.overrides)}
    if args.init and (Path(args.init) / "pretrain_summary.json").exists():  # the whole history of the weights
        summary["init_summary"] = json.loads((Path(args.init) / "pretrain_summary.json").read_text())
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
    log(f"saved {out} ({summary['seconds']:.0f}s)")
    return summary


if __name__ == "__main__":
    pretrain(*parse(sys.argv[1:]))
