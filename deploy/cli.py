"""`vla-grpo COMMAND CONFIG [section.field=value ...]` — the console entry point.

One subcommand each (train, eval, sft, demo, serve, config) with its own `--help`: what it does,
what it writes, an example. CONFIG and overrides are validated before anything starts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.config_loading import ConfigError, load_config


def _train(cfg, args):
    import time

    from deploy.runtime import Rollout, init_ray
    from deploy.train import GRPOTrainer

    deadline = None if cfg.wall_budget_minutes is None else time.monotonic() + 60 * cfg.wall_budget_minutes
    init_ray(cfg)
    rollout = Rollout.start(cfg, str(cfg.policy.path))
    trainer = GRPOTrainer(cfg, str(cfg.policy.path), rollout)
    try:
        trainer.run(Path(cfg.run_dir) / "rl_policy", deadline)
        trainer.save_checkpoint()
    finally:
        trainer.shutdown()
        rollout.shutdown()


def _eval(cfg, args):
    from deploy.evaluate import eval_config, evaluate, format_report
    from deploy.runtime import Rollout, init_ray

    cfg = eval_config(cfg)  # the evaluation step limit (env.eval_max_steps / the suite's)
    init_ray(cfg)
    rollout = Rollout.start(cfg, str(cfg.policy.path))
    try:
        report = evaluate(rollout, Path(cfg.run_dir) / "eval", cfg.eval.episodes_per_task, cfg.eval.videos)
    finally:
        rollout.shutdown()
    print(format_report(report))
    print(json.dumps({"success": report["success"], "episodes": report["episodes"]}))


def _sft(cfg, args):
    from deploy.runtime import init_ray
    from deploy.sft import run_sft

    init_ray(cfg)
    out = Path(cfg.run_dir) / "sft_policy"
    summary = run_sft(cfg, out)
    print(f"SFT policy written to {out} (final loss {summary['losses'][-1]:.4f})")


def _demo(cfg, args):
    from deploy.demo import run_demo

    run_demo(cfg)


def _serve(cfg, args):
    from deploy.serve import run_serve

    run_serve(cfg, host=args.host, port=args.port, token_file=args.token_file, auth=not args.no_auth)


def _config(cfg, args):
    print(config_yaml(cfg), end="")


def config_yaml(cfg) -> str:
    """The complete resolved config (every default included) as YAML that load_config reads back."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# name: (function, one-line summary, description: what it does and writes, example)
COMMANDS = {
    "train": (_train, "GRPO reinforcement learning on Ray, starting from policy.path", """\
Online GRPO on Ray: env workers roll out groups of episodes with the policy served
from policy.path, the learner updates it from group-relative advantages, for
total_steps RL steps (or until wall_budget_minutes).

Writes, under run_dir:
  metrics.jsonl          one JSON line of scalars per RL step
  tensorboard/           the same scalars for TensorBoard (logging.tensorboard)
  checkpoints/step_N/    full resume state every checkpoint.every steps (checkpoint.keep kept)
  rl_policy/             the final policy folder (loadable by eval, serve and train)""",
              "vla-grpo train configs/demo.yaml policy.path=runs/demo/sft_policy run_dir=runs/rl"),
    "eval": (_eval, "greedy evaluation of policy.path on the config's tasks", """\
Greedy evaluation of policy.path on the config's tasks and held-out initial states
(eval.episodes_per_task per task); prints a per-task table and a JSON summary line.

Writes, under run_dir:
  eval/eval.json         the report: success per task and overall
  eval/videos/*.mp4      the first eval.videos episodes per task""",
             "vla-grpo eval configs/demo.yaml policy.path=runs/demo/rl_policy eval.videos=2"),
    "sft": (_sft, "supervised warm start on demonstrations", """\
Supervised warm start (the sft section) on demonstrations: sft.dataset (robomimic /
LIBERO HDF5) or, when unset, demos recorded from the built-in scripted experts on
train initial states. Its output is the usual policy.path for train.

Writes, under run_dir:
  sft_policy/            the fine-tuned policy folder (use it as policy.path)
  demos/                 the recorded expert demos (when sft.dataset is unset)""",
            "vla-grpo sft configs/demo.yaml run_dir=runs/demo sft.steps=300"),
    "demo": (_demo, "SFT -> eval -> GRPO -> eval, with a report (what `make demo` runs)", """\
The whole pipeline on one machine: SFT on expert demos, greedy evaluation, GRPO
on Ray, greedy evaluation again, and a report of the change in success.

Writes, under run_dir (runs/demo with configs/demo.yaml):
  report.json            success before and after RL, per task, timings
  success_vs_step.png    success rate over RL steps
  eval_sft/, eval_rl/    the two evaluations (eval.json, videos/*.mp4)
  sft_policy/, rl_policy/  the policy folders before and after RL
  config.yaml, metrics.jsonl, tensorboard/, checkpoints/""",
             "vla-grpo demo configs/demo.yaml"),
    "serve": (_serve, "the HTTP policy API for robots, until Ctrl-C (docs/serving.md)", """\
Serves policy.path over HTTP on Ray Serve (POST /v1/act, GET /v1/info, GET /healthz)
until Ctrl-C or SIGTERM. Bearer-token auth is on: the token comes from --token-file
or $VLA_API_TOKEN, and without one serve refuses to start. Contract: docs/serving.md.

Writes nothing; serves HTTP on --host:--port.""",
              "vla-grpo serve configs/demo.yaml policy.path=runs/demo/rl_policy --token-file ~/.vla_api_token"),
    "config": (_config, "print the fully resolved config (defaults included) as YAML; runs nothing", """\
Prints the complete config that CONFIG plus the overrides resolve to, every default
included, as YAML (the same text a run's config.yaml holds). Starts nothing; a bad
field fails here exactly as it would for train.

Writes nothing; prints to stdout.""",
               "vla-grpo config configs/demo.yaml learner.lr=1e-5 > resolved.yaml"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="vla-grpo", description="Online GRPO for vision-language-action policies on Ray.",
        epilog="Every command takes CONFIG (a YAML run config) and section.field=value overrides.\n"
               "`vla-grpo COMMAND --help` says what a command does and writes.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = {}
    for name, (_, summary, description, example) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=description, epilog=f"example:\n  {example}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("config", metavar="CONFIG", help="YAML run config, e.g. configs/demo.yaml")
        sub.add_argument("overrides", nargs="*", metavar="section.field=value",
                         help="overrides of CONFIG's values, e.g. learner.lr=1e-5 run_dir=runs/x")
        subparsers[name] = sub
    serve = subparsers["serve"]
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; "
                       "0.0.0.0 for robots on other machines)")
    serve.add_argument("--port", type=int, default=8000, help="default %(default)s")
    serve.add_argument("--token-file", default=None, help="file holding the Bearer token (else $VLA_API_TOKEN)")
    serve.add_argument("--no-auth", action="store_true", help="serve without a token (trusted networks only)")
    return parser, subparsers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, subparsers = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse (3.11) leaves overrides that follow an option unassigned; they still belong to the overrides
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += extra
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from deploy.runtime import apply_default_env

    apply_default_env()  # before anything imports MuJoCo or DeepSpeed (the preflight's task lists do)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command != "config":
            from deploy.preflight import preflight

            preflight(cfg, args.command)  # what only this machine can tell, before any Ray process starts
    except ConfigError as err:
        sys.exit(str(err))
    COMMANDS[args.command][0](cfg, args)


if __name__ == "__main__":
    main()
