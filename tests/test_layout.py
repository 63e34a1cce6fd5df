"""The repository keeps the agreed layout and small, focused modules."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["common", "policy", "learner", "env_workers", "services", "actors", "deploy"]


def test_every_role_is_a_package():
    for name in PACKAGES:
        assert (ROOT / name / "__init__.py").is_file(), name
    for folder in ["configs", "k8s", "tests"]:
        assert (ROOT / folder).is_dir(), folder
    for f in ["pyproject.toml", "Makefile", "README.md", "constraints.txt", ".ci/run"]:
        assert (ROOT / f).is_file(), f


def test_no_module_is_over_400_lines():
    long = []
    for name in PACKAGES + ["scripts", "tests"]:
        for path in (ROOT / name).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > 400:
                long.append(f"{path.relative_to(ROOT)}: {n}")
    assert not long, long


def test_pins_live_in_one_place():
    pins = (ROOT / "constraints.txt").read_text()
    for pin in ["torch==2.13.0", "numpy==1.26.4", "mujoco==3.3.7", "ray==2.60.0"]:
        assert pin in pins
    assert "torchvision" not in pins.replace("never add torchvision", "")
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
