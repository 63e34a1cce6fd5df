"""`vla-grpo COMMAND CONFIG [section.field=value ...]` — the console entry point."""

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

    if cfg.policy.path is None:
        sys.exit("train needs a policy to start from: set policy.path=/local/policy/folder (e.g. the output of `vla-grpo sft`)")
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

    if cfg.policy.path is None:
        sys.exit("eval needs policy.path=/local/policy/folder")
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


COMMANDS = {"train": _train, "eval": _eval, "sft": _sft, "demo": _demo, "serve": _serve}


def main(argv: list[str] | None = None) -> None:
    from deploy.runtime import apply_default_env

    apply_default_env()  # before anything imports MuJoCo or DeepSpeed
    parser = argparse.ArgumentParser(prog="vla-grpo", description="Online GRPO for VLA policies on Ray")
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    serve = parser.add_argument_group("serve (the HTTP policy API, docs/serving.md)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-file", default=None, help="file holding the Bearer token (else $VLA_API_TOKEN)")
    serve.add_argument("--no-auth", action="store_true", help="serve without a token (trusted networks only)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(str(err))
    COMMANDS[args.command](cfg, args)


if __name__ == "__main__":
    main()
