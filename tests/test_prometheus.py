"""The run's metrics reach a real Prometheus: a Ray head started with `--metrics-export-port`, a
`vla-grpo train` job submitted to it, and Prometheus (Debian's `prometheus` package) scraping the
head's metrics agent every second. The driver's gauges and counter must be queryable under the
names docs/operations.md and the Grafana dashboard use (`ray_` prefix added by Ray's exporter)."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from deploy.job_submit import LocalHead, free_port, job_entrypoint, submit, wait_for_job
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# series -> check on the value of its newest sample
SERIES = {
    "ray_vla_env_steps_per_second": lambda v: v > 0,
    "ray_vla_success_rate_ratio": lambda v: 0.0 <= v <= 1.0,
    "ray_vla_policy_lag_versions": lambda v: v == 0.0,  # strict on-policy
    "ray_vla_env_steps_total": lambda v: v > 0,
    "ray_vla_learning_rate": lambda v: v > 0,
    "ray_vla_validation_success_ratio": lambda v: 0.0 <= v <= 1.0,  # eval.validate_every below
    "ray_vla_best_validated_step": lambda v: v >= 1,
}
PROMETHEUS = shutil.which("prometheus") or next(
    (p for p in ("/usr/bin/prometheus", "/usr/sbin/prometheus") if os.path.exists(p)), None)


def _get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = _get_json(url)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus on a free port scraping a (not yet started) target; yields (url, target port)."""
    if PROMETHEUS is None:
        pytest.skip("no `prometheus` binary: install Debian's `prometheus` package (apt-get install prometheus; "
                    "make test installs it through APT_PKGS)")
    target_port, web_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web_port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready in 30s:\n" + (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        yield base, target_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_training_metrics_are_scraped_by_prometheus(prometheus, tiny_policy_dir, tmp_path):
    base, metrics_port = prometheus
    found: dict[str, float] = {}

    def all_scraped() -> bool:
        for name in SERIES:
            if name not in found:
                # last_over_time: a gauge stays queryable after the driver (and its export) ended
                result = _query(base, f"last_over_time({name}[10m])")
                if result:
                    found[name] = float(result[0]["value"][1])
        return len(found) == len(SERIES)

    start = time.monotonic()
    # a faster metrics export than the 10 s default, so a short job's gauges get out before it ends
    with LocalHead(num_cpus=2, metrics_export_port=metrics_port, env={"RAY_metrics_report_interval_ms": "2000"}) as head:
        entry = job_entrypoint("train", "configs/tiny.yaml", [
            f"policy.path={tiny_policy_dir}", f"run_dir={tmp_path / 'run'}", "total_steps=3",
            "rollout.min_group_success=0.0", "env.max_steps=24", "cluster.learner_world_size=1",
            "checkpoint.every=100", "eval.validate_every=1", "eval.validation_states_per_task=1",
        ], python=sys.executable)
        job_id = submit(head.dashboard_url, entry, working_dir=ROOT)
        # stop waiting as soon as every series is in Prometheus (the job may still be running)
        status, logs = wait_for_job(head.dashboard_url, job_id, timeout_s=240, until=all_scraped)
        assert status != "FAILED", f"job {job_id} failed; log tail:\n{logs[-4000:]}"
        grace = time.monotonic() + 30  # the job ended: give the last export and scrape a moment
        while not all_scraped() and time.monotonic() < grace:
            time.sleep(1)
        targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets
        missing = sorted(set(SERIES) - set(found))
        if missing:
            names = [n for n in _get_json(f"{base}/api/v1/label/__name__/values")["data"] if n.startswith("ray_vla")]
            pytest.fail(f"not in Prometheus: {missing} (job {status}); vla series it has: {names}\n"
                        f"job log tail:\n{logs[-3000:]}")
    for name, check in SERIES.items():
        assert check(found[name]), f"{name} = {found[name]}"
    # the series carry Ray's labels: which component recorded them
    labels = _query(base, "last_over_time(ray_vla_success_rate_ratio[10m])")[0]["metric"]
    assert labels.get("job") == "ray" and labels.get("instance") == f"127.0.0.1:{metrics_port}", labels
    print(f"metrics in Prometheus after {time.monotonic() - start:.0f}s: {found}")
