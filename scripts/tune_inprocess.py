"""In-process copy of the demo's SFT -> eval -> GRPO -> eval loop, for fast A/B tuning.

Same policy, env, tokenizer, SFT samples, Trajectory records, group advantages, dynamic-sampling
bounds and GRPO batch loss (learner.engine.grpo_batch_loss) as the Ray pipeline, but in one process with plain torch (no Ray, no DeepSpeed, no Serve), so
eight variants fit side by side on a 16-core machine (a GPU, when present, runs the model). It
is a tuning tool, not the product: numbers from it are labelled "in-process" in docs/demo.md, and
`make demo` is what the project measures.

usage: python scripts/tune_inprocess.py CONFIG NAME SECONDS [--envs N] [--threads N] [key=value ...]
       SECONDS is the GRPO wall budget; results go to runs/tune/NAME/{log.txt,result.json}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.samplers import make_sampler  # noqa: E402
from common.config_loading import load_config  # noqa: E402
from common.records import Trajectory  # noqa: E402
from env_workers.demos import dataset_statistics, record_demos, record_suite_demos  # noqa: E402
from env_workers.factory import env_scaled_action_dims, env_scene_shift, make_env  # noqa: E402
from learner.engine import grpo_batch_loss, sft_batch_loss  # noqa: E402
from learner.grpo import group_advantages, keep_group  # noqa: E402
from learner.lr_schedule import run_progress, scheduled_lr  # noqa: E402
from learner.sft_data import DemoSamples, build_sft_samples, sft_batch  # noqa: E402
from learner.success_replay import SuccessReplay  # noqa: E402
from learner.weight_average import WeightAverage  # noqa: E402
from policy.action_tokenizer import postprocess_gripper  # noqa: E402
from policy.checkpoint import initial_policy  # noqa: E402


def parse(argv: list[str]):
    if len(argv) < 3:
        sys.exit(__doc__)
    config, name, seconds, rest = argv[0], argv[1], float(argv[2]), argv[3:]
    opts = {"--envs": 16, "--threads": 2}
    overrides = []
    it = iter(rest)
    for a in it:
        if a in opts:
            opts[a] = int(next(it))
        else:
            overrides.append(a)
    return load_config(config, overrides), name, seconds, opts["--envs"], opts["--threads"], overrides


class Loop:
    def __init__(self, cfg, name: str, n_envs: int):
        self.cfg = cfg
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator(device=self.dev)
        self.gen.manual_seed(cfg.seed)
        self.envs = [make_env(cfg.env) for _ in range(n_envs)]
        self.tasks = cfg.env.tasks or self.envs[0].task_names
        self.out = Path("runs/tune") / name
        self.out.mkdir(parents=True, exist_ok=True)
        self._log = open(self.out / "log.txt", "w")
        self.name, self.t0 = name, time.time()

    def log(self, text: str) -> None:
        print(f"[{self.name} {time.time() - self.t0:6.0f}s] {text}", flush=True)
        self._log.write(text + "\n")
        self._log.flush()

    def _optimizer(self, lr: float, frozen_modules=()):
        """A fresh AdamW over all but `frozen_modules` (as LearnerEngine, which each phase builds anew)."""
        self.policy.model.requires_grad_(True)
        self.policy.model.freeze(frozen_modules)
        return torch.optim.AdamW([p for p in self.policy.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def _step(self, opt, loss) -> None:
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), self.cfg.learner.grad_clip)
        opt.step()

    def sft(self) -> None:
        cfg = self.cfg
        demos = record_demos(self.envs[0], self.tasks, cfg.sft.demos_per_task)
        norm = {cfg.policy.unnorm_key or cfg.env.suite: dataset_statistics(demos, scaled_dims=env_scaled_action_dims(cfg.env))}
        self.policy = initial_policy(cfg.policy, norm, seed=cfg.seed)  # as deploy/sft.py
        self.policy.model.to(self.dev)
        images, instr, chunks, proprio = build_sft_samples(demos, cfg.policy.action_chunk)
        proprio = proprio if self.policy.uses_proprio else None
        scene = env_scene_shift(cfg.env) if cfg.sft.shift_moves_labels else None
        lc = cfg.learner
        # (name, coef, samples per mini-batch, DemoSamples), as LearnerWorker.sample_terms
        self.sample_terms = []
        if lc.demo_bc_coef > 0:
            self.sample_terms.append(("demo_bc", lc.demo_bc_coef, lc.demo_bc_batch_size,
                                      DemoSamples(images, instr, chunks, proprio, cfg.sft.shift_augment_px, scene)))
        if lc.rehearsal_coef > 0:  # recorded as deploy/train.py does
            r_images, r_instr, r_chunks, r_proprio = build_sft_samples(
                record_suite_demos(cfg.env, lc.rehearsal_suite, lc.rehearsal_demos_per_task), cfg.policy.action_chunk)
            self.sample_terms.append(("rehearsal", lc.rehearsal_coef, lc.rehearsal_batch_size,
                                      DemoSamples(r_images, r_instr, r_chunks, r_proprio if self.policy.uses_proprio else None,
                                                  cfg.sft.shift_augment_px, scene)))
        opt = self._optimizer(cfg.sft.lr, cfg.sft.frozen_modules)
        for step in range(cfg.sft.steps):
            idx = self.rng.choice(len(images), size=cfg.sft.batch_size)
            batch_images, tokens, batch_proprio = sft_batch(images, chunks, proprio, idx, cfg.sft.shift_augment_px, scene,
                                                            self.policy.stats, self.policy.action_tokenizer, self.rng)
            loss = sft_batch_loss(self.policy, batch_images, [instr[i] for i in idx], tokens, batch_proprio)
            self._step(opt, loss)
            if (step + 1) % 250 == 0:
                self.log(f"sft {step + 1} loss {loss.item():.3f}")

    def rollout(self, requests: list[tuple[str, int]], greedy: bool, temperature: float) -> list[Trajectory]:
        """Episodes for (task, init state) requests as the pipeline's Trajectory records; like the
        env workers, an env takes the next request as soon as its episode ends and finished envs
        get no inference."""
        pending, results = list(enumerate(requests)), [None] * len(requests)
        slots: list[dict | None] = [None] * len(self.envs)
        while pending or any(slots):
            for i, env in enumerate(self.envs):
                if slots[i] is None and pending:
                    k, (task, state) = pending.pop(0)
                    slots[i] = dict(k=k, task=task, state=state, obs=env.reset(task, state), chunks=[], images=[],
                                    proprio=[], executed=[], steps=0)
            active = [i for i, s in enumerate(slots) if s is not None]
            chunks = self.policy.act([slots[i]["obs"] for i in active], temperature=temperature, greedy=greedy,
                                     generator=self.gen)
            for i, chunk in zip(active, chunks):
                s = slots[i]
                res = self.envs[i].step_chunk(postprocess_gripper(chunk.actions))
                ran = np.zeros(chunk.tokens.shape[0], bool)
                ran[: res.steps] = True
                s["chunks"].append(chunk)
                s["images"].append(s["obs"].image)
                s["proprio"].append(s["obs"].proprio)
                s["executed"].append(ran)
                s["steps"] += res.steps
                instruction, s["obs"] = s["obs"].instruction, res.observation
                if res.done:
                    results[s["k"]] = Trajectory(
                        task=s["task"], init_state=s["state"], instruction=instruction, images=np.stack(s["images"]),
                        tokens=np.stack([c.tokens for c in s["chunks"]]), logprobs=np.stack([c.logprobs for c in s["chunks"]]),
                        executed=np.stack(s["executed"]), success=bool(res.success), env_steps=s["steps"],
                        policy_version=0,
                        proprio=None if s["proprio"][0] is None else np.stack(s["proprio"]).astype(np.float32))
                    slots[i] = None
        return results

    def evaluate(self, split: str = "eval", per_task: int | None = None) -> tuple[float, dict]:
        per_task = per_task or self.cfg.eval.episodes_per_task
        reqs = [(t, st) for t in self.tasks for st in self.envs[0].init_states(t, split)[:per_task]]
        res = self.rollout(reqs, greedy=True, temperature=1.0)
        per_task = {t: float(np.mean([r.success for r in res if r.task == t])) for t in self.tasks}
        return float(np.mean([r.success for r in res])), per_task

    def grpo_update(self, opt, batch: list[list[Trajectory]]) -> None:
        cfg = self.cfg
        trajs = [r for group in batch for r in group]
        rewards = torch.tensor([float(r.success) for r in trajs])
        group_ids = torch.tensor([g for g, group in enumerate(batch) for _ in group])
        advantages = group_advantages(rewards, group_ids).numpy()
        order = self.rng.permutation(len(trajs))
        for _ in range(cfg.learner.epochs):  # as LearnerGroup.grpo_step: the same order every epoch
            for start in range(0, len(trajs), cfg.learner.mini_batch_size):  # one optimiser step per mini-batch
                sel = order[start : start + cfg.learner.mini_batch_size]
                loss, _ = grpo_batch_loss(self.policy, [trajs[i] for i in sel], advantages[sel], cfg.rollout.temperature,
                                          cfg.learner)
                for _, coef, size, samples in self.sample_terms:  # learner.demo_bc_coef, learner.rehearsal_coef
                    drawn = samples.batch(size, self.policy.stats, self.policy.action_tokenizer, self.rng)
                    loss = loss + coef * sft_batch_loss(self.policy, *drawn)
                if self.replay is not None:  # as the learner: successes of earlier mini-batches only
                    replayed = self.replay.batch(cfg.learner.success_replay_batch_size, self.rng)
                    if replayed is not None:
                        loss = loss + cfg.learner.success_replay_coef * sft_batch_loss(self.policy, *replayed)
                self._step(opt, loss)
                if self.replay is not None:
                    self.replay.add([trajs[i] for i in sel])

    def grpo(self, seconds: float) -> list[float]:
        """GRPO iterations until `seconds` pass; returns the rollout success of each iteration."""
        cfg = self.cfg
        G, n = cfg.rollout.groups_per_batch, cfg.rollout.group_size
        pairs = [(t, st) for t in self.tasks for st in self.envs[0].init_states(t, "train")]
        sampler = make_sampler(pairs, cfg.seed, cfg.rollout)  # as the coordinator
        self.ema = None if cfg.learner.ema_decay is None else WeightAverage(self.policy.model, cfg.learner.ema_decay)
        self.replay = SuccessReplay(cfg.learner.success_replay_capacity) if cfg.learner.success_replay_coef > 0 else None
        opt, surplus, history = self._optimizer(cfg.learner.lr, cfg.learner.frozen_modules), [], []
        self.validations, self.best = [], None  # eval.validate_every: (iteration, success), (success, weights)
        start = time.time()
        while time.time() - start < seconds:
            batch, surplus, successes = surplus[:G], surplus[G:], []
            for _ in range(cfg.rollout.max_rounds):
                if len(batch) >= G:
                    break
                reqs = [pair for _ in range(G) for pair in [sampler.next()] * n]
                res = self.rollout(reqs, greedy=False, temperature=cfg.rollout.temperature)
                for g in range(G):
                    group = res[g * n : (g + 1) * n]
                    rate = float(np.mean([r.success for r in group]))
                    successes.append(rate)
                    kept = keep_group(rate, cfg.rollout.min_group_success, cfg.rollout.max_group_success)
                    sampler.observe(group[0].task, rate, init_state=group[0].init_state)
                    if kept:
                        batch.append(group)
            surplus += batch[G:]  # dynamic sampling keeps the surplus for the next step
            if batch:
                progress = run_progress(len(history), cfg.total_steps, time.time() - start, seconds)
                for group in opt.param_groups:
                    group["lr"] = scheduled_lr(cfg.learner, progress)
                self.grpo_update(opt, batch[:G])
                if self.ema is not None:  # as the learner: once per RL step
                    self.ema.update(self.policy.model)
            history.append(float(np.mean(successes)))
            if cfg.eval.validate_every and len(history) % cfg.eval.validate_every == 0:
                self.validate(len(history))
            if len(history) % 10 == 0:
                weights = {t: round(w, 2) for t, w in sampler.weights().items()}
                self.log(f"iteration {len(history)}  rollout success (last 10) {np.mean(history[-10:]):.3f}  "
                         f"task weights {json.dumps(weights)}")
        if cfg.eval.validate_every and (not self.validations or self.validations[-1][0] != len(history)):
            self.validate(len(history))
        return history

    def validate(self, iteration: int) -> None:
        """Greedy success on the first eval.validation_states_per_task train states; keeps the best
        weights (as deploy/validation.py: the earlier on a tie)."""
        success, _ = self.evaluate("train", self.cfg.eval.validation_states_per_task)
        self.validations.append((iteration, success))
        if self.best is None or success > self.best[0]:
            self.best = (success, iteration, {k: v.detach().clone() for k, v in self.policy.model.state_dict().items()})
        self.log(f"validation at iteration {iteration}: {success:.3f} (best {self.best[0]:.3f} at {self.best[1]})")


def main() -> None:
    cfg, name, seconds, n_envs, threads, overrides = parse(sys.argv[1:])
    torch.set_num_threads(threads)
    loop = Loop(cfg, name, n_envs)
    loop.sft()
    sft, sft_per_task = loop.evaluate()
    loop.log(f"SFT {sft:.3f} {json.dumps({k: round(v, 2) for k, v in sft_per_task.items()})}")
    history = loop.grpo(seconds)
    rl_live, rl_live_per_task = loop.evaluate()
    rl, rl_per_task = rl_live, rl_live_per_task
    if loop.ema is not None:  # what the pipeline saves and evaluates; the live weights' success is kept beside it
        loop.ema.load_into(loop.policy.model)
        rl, rl_per_task = loop.evaluate()
        loop.log(f"live weights: RL {rl_live:.3f} {json.dumps({k: round(v, 2) for k, v in rl_live_per_task.items()})}")
    loop.log(f"after {len(history)} GRPO iterations: SFT {sft:.3f} -> RL {rl:.3f} "
             f"{json.dumps({k: round(v, 2) for k, v in rl_per_task.items()})}")
    selected = {}
    if loop.best is not None:  # the last policy's numbers stay in rl / rl_per_task, for comparison
        loop.policy.model.load_state_dict(loop.best[2])
        rl_best, rl_best_per_task = loop.evaluate()
        loop.log(f"validated best (iteration {loop.best[1]}): RL {rl_best:.3f} "
                 f"{json.dumps({k: round(v, 2) for k, v in rl_best_per_task.items()})}")
        selected = dict(rl_best=rl_best, rl_best_per_task=rl_best_per_task, best_iteration=loop.best[1],
                        validations=loop.validations)
    result = dict(name=name, overrides=overrides, sft=sft, rl=rl, rl_live=rl_live, iterations=len(history),
                  sft_per_task=sft_per_task, rl_per_task=rl_per_task, rollout_success=history, **selected)
    (loop.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
