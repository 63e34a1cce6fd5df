"""Ray token authentication in k8s/ and the image: every KubeRay object turns it on
(`spec.authOptions`, so the operator itself can reach the dashboard), every Ray container and the
job submitter get `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN` from the Secret that authOptions names,
nothing sets the mode to anything else, and deploy/Dockerfile neither disables it nor bakes in a token."""

from __future__ import annotations

import copy
import re
import shlex

from tests.test_k8s_manifests import ALL, CRD_FILES, ROOT, _cluster_spec, _containers, _groups, _of_kind

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TOKEN_KEY = "auth_token"  # the Secret key KubeRay reads with authOptions.secretName


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env") or []}


def _own_containers(doc):
    """(label, container) for the containers written out in the manifest: every group's pod
    containers and the RayJob's submitter (KubeRay adds the autoscaler and init containers itself)."""
    for name, g in _groups(doc):
        yield from ((f"{name}/{c['name']}", c) for c in g["template"]["spec"]["containers"])
    for c in doc["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
        yield f"submitter/{c['name']}", c


def check_token_auth(docs):
    problems = []
    for d in [d for d in docs if d["kind"] in CRD_FILES]:
        where = f"{d['kind']} {d['metadata']['name']}"
        spec = _cluster_spec(d)
        auth = spec.get("authOptions") or {}
        secret = auth.get("secretName")
        if auth.get("mode") != "token" or not secret or auth.get("enableK8sTokenAuth"):
            problems.append(f"{where}: authOptions {auth}, want mode token and a secretName")
        for c in _containers(d):  # anything else that sets the variables must agree
            for name, e in _env(c).items():
                if name == "RAY_AUTH_MODE" and e.get("value") != "token":
                    problems.append(f"{where}/{c.get('name', 'autoscaler')}: RAY_AUTH_MODE={e.get('value')!r}")
                if name == "RAY_AUTH_TOKEN" and (e.get("value") is not None or e.get("valueFrom", {}).get(
                        "secretKeyRef") != {"name": secret, "key": TOKEN_KEY}):
                    problems.append(f"{where}/{c.get('name', 'autoscaler')}: RAY_AUTH_TOKEN is not "
                                    f"secretKeyRef {secret}/{TOKEN_KEY}: {e}")
        for label, c in _own_containers(d):
            missing = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} - set(_env(c))
            if missing:
                problems.append(f"{where}/{label}: no {sorted(missing)}")
        # KubeRay appends autoscalerOptions.env after the auth variables it sets: a second copy
        set_there = set(AUTH_VARS) & set(_env(spec.get("autoscalerOptions", {})))
        if set_there:
            problems.append(f"{where}: autoscalerOptions.env sets {sorted(set_there)}; authOptions does that")
    return problems


def test_every_ray_container_runs_with_token_auth_from_the_secret():
    assert check_token_auth(ALL) == []


def test_token_auth_check_catches_broken_copies():
    def spec(docs, kind):
        return _cluster_spec(_of_kind(docs, kind)[0])

    def head_env(docs, kind="RayCluster"):
        return spec(docs, kind)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]

    def set_var(env, name, **entry):
        env[:] = [e for e in env if e["name"] != name] + [{"name": name, **entry}]

    def drop_worker_env(docs):
        worker = _groups(_of_kind(docs, "RayJob")[0])[1][1]["template"]["spec"]["containers"][0]
        worker["env"] = [e for e in worker["env"] if not e["name"].startswith("RAY_AUTH_")]

    def submitter(docs):
        return _of_kind(docs, "RayJob")[0]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]

    edits = {
        "mode disabled": lambda docs: set_var(head_env(docs), "RAY_AUTH_MODE", value="disabled"),
        "no authOptions": lambda docs: spec(docs, "RayService").pop("authOptions"),
        "authOptions off": lambda docs: spec(docs, "RayJob")["authOptions"].update(mode="disabled"),
        "literal token": lambda docs: set_var(submitter(docs)["env"], "RAY_AUTH_TOKEN", value="hunter2"),
        "other Secret": lambda docs: set_var(head_env(docs, "RayService"), "RAY_AUTH_TOKEN", valueFrom={
            "secretKeyRef": {"name": "some-other-secret", "key": TOKEN_KEY}}),
        "worker without auth": drop_worker_env,
        "submitter without auth": lambda docs: submitter(docs).pop("env"),
        "autoscaler env": lambda docs: spec(docs, "RayCluster")["autoscalerOptions"]["env"].append(
            {"name": "RAY_AUTH_MODE", "value": "token"}),
    }
    for what, edit in edits.items():
        docs = copy.deepcopy(ALL)
        edit(docs)
        assert check_token_auth(docs), f"check_token_auth missed: {what}"


def _dockerfile_env(text: str) -> dict[str, str]:
    """KEY -> value of every ENV and ARG instruction (continuation lines joined, comments dropped)."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    out = {}
    for inst in re.split(r"\n(?=\S)", "\n".join(lines).replace("\\\n", " ")):
        word, _, rest = inst.strip().partition(" ")
        if word.upper() in ("ENV", "ARG"):
            out.update(part.split("=", 1) if "=" in part else (part, "") for part in shlex.split(rest))
    return out


def test_the_image_does_not_disable_auth_or_hold_a_token():
    env = _dockerfile_env((ROOT / "deploy" / "Dockerfile").read_text())
    assert "DS_ACCELERATOR" in env and "MUJOCO_GL" in env  # the parser sees the image's ENV block
    assert env.get("RAY_AUTH_MODE", "token") == "token", env.get("RAY_AUTH_MODE")
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env), "a token in an image layer is no secret"
    assert _dockerfile_env("ENV A=1 \\\n    RAY_AUTH_MODE=disabled\n")["RAY_AUTH_MODE"] == "disabled"
