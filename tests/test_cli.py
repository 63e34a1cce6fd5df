"""The `vla-grpo` command line: each command's own help, `vla-grpo config` printing the resolved
config, and bad input refused with a message naming the field before anything starts."""

import subprocess
import sys

import pytest
import yaml

from common.config_loading import load_config, validate_config
from deploy.cli import COMMANDS, main, parse_args
from tests.conftest import ROOT

DEMO = str(ROOT / "configs" / "demo.yaml")
SERVE_ONLY = ["--host", "--port", "--token-file", "--no-auth"]
WRITES = {  # what each command's help must say it writes
    "train": ["metrics.jsonl", "tensorboard/", "checkpoints/step_N/", "rl_policy/"],
    "eval": ["eval/eval.json", "eval/videos/"],
    "sft": ["sft_policy/"],
    "demo": ["report.json", "success_vs_step.png", "videos", "sft_policy/", "rl_policy/"],
    "serve": ["Writes nothing", "/v1/act"],
    "config": ["Writes nothing", "stdout"],
}


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_command_has_a_help_entry():
    assert set(WRITES) == set(COMMANDS)


@pytest.mark.parametrize("command", list(WRITES))
def test_each_command_has_its_own_help(command, capsys):
    text = help_of([command], capsys)
    assert text.startswith(f"usage: vla-grpo {command} [-h]")
    assert "CONFIG" in text and "section.field=value" in text
    assert f"example:\n  vla-grpo {command} " in text
    for item in WRITES[command]:
        assert item in text, (command, item)
    for option in SERVE_ONLY:
        assert (option in text) == (command == "serve"), (command, option)


def test_global_help_lists_the_commands(capsys):
    text = help_of([], capsys)
    for command in COMMANDS:
        assert f"\n    {command} " in text
    assert "--host" not in text


def test_serve_options_belong_to_serve_only(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", DEMO, "--host", "0.0.0.0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "vla-grpo train: error: unrecognized arguments: --host 0.0.0.0" in err
    args = parse_args(["serve", DEMO, "policy.path=p", "--port", "9000", "seed=3", "--no-auth"])
    assert (args.port, args.no_auth, args.host, args.token_file) == (9000, True, "127.0.0.1", None)
    assert args.overrides == ["policy.path=p", "seed=3"]  # an override after an option is still an override


def test_config_prints_the_complete_resolved_config(capsys):
    main(["config", DEMO, "learner.lr=0.001", "checkpoint.keep=3"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["learner"]["lr"] == 0.001 and printed["checkpoint"]["keep"] == 3
    # every default is there: the printed config is the loaded one, and reads back to it
    expected = load_config(DEMO, ["learner.lr=0.001", "checkpoint.keep=3"])
    assert validate_config(printed) == expected
    in_file = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    defaults = type(expected.learner)().model_dump(mode="json")
    absent = set(defaults) - set(in_file.get("learner", {}))
    assert absent, "demo.yaml sets every learner field; pick another section"
    for name in absent:
        assert printed["learner"][name] == defaults[name], name
    assert set(printed) == set(expected.model_dump())


@pytest.mark.parametrize("override,named", [
    ("learner.lrr=1", "learner.lrr"),
    ("learner.lr=-1", "learner.lr"),
    ("lr=1", "'lr'"),
])
def test_bad_override_fails_naming_the_field(override, named):
    for command in ("config", "train"):
        done = subprocess.run([sys.executable, "-m", "deploy.cli", command, DEMO, override], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done
        assert done.stdout == "" and named in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) <= 3, done.stderr


def test_missing_config_file_fails(capsys):
    with pytest.raises(SystemExit, match="config file not found"):
        main(["config", str(ROOT / "configs" / "no_such.yaml")])
