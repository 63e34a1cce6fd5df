"""`vla-grpo demo` end to end with the tiny policy on a real local Ray cluster: expert demos, SFT,
greedy evaluation, GRPO with validation, evaluation again, and what it leaves in the run folder."""

import json

from common.config_loading import load_config
from tests.conftest import ROOT


def test_demo_writes_report_plot_videos_and_evaluation_metrics(ray_cluster, tmp_path):
    from deploy.demo import run_demo

    tasks = ["red_in_bowl", "green_in_bowl"]
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"run_dir={tmp_path}", f"env.tasks=[{','.join(tasks)}]", "sft.steps=2",
        "eval.episodes_per_task=2", "eval.videos=1", "total_steps=2", "rollout.min_group_success=0.0",
        "eval.validate_every=1", "eval.validation_states_per_task=1", "checkpoint.every=100",
        "rollout.task_sampling=adaptive_state",  # as configs/demo.yaml
    ])
    report = run_demo(cfg)

    assert report["rl_steps"] == 2 and report["rl_ended_by"] == "total_steps"
    assert report["eval_episodes"] == 2 * len(tasks) and set(report["per_task"]) == set(tasks)
    assert [h["step"] for h in report["history"]] == [1, 2]
    selection = report["selection"]
    assert [h["step"] for h in selection["history"]] == [1, 2] and selection["best_step"] in (1, 2)
    assert json.loads((tmp_path / "report.json").read_text())["rl_success"] == report["rl_success"]
    assert (tmp_path / "success_vs_step.png").stat().st_size > 0
    for name in ("eval_sft", "eval_rl"):  # one video per task
        assert len(list((tmp_path / name / "videos").glob("*.mp4"))) == len(tasks)
    assert (tmp_path / "rl_policy" / "model.safetensors").is_file()
    # both evaluations reach the metrics sinks (Prometheus gauge vla_eval_success_rate_ratio)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(m["step"], m["eval/success_rate"]) for m in lines if "eval/success_rate" in m]
    assert evals == [(0, report["sft_success"]), (2, report["rl_success"])]
