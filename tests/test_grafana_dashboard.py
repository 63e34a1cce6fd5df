"""The Grafana dashboard queries only metrics the system exports, under the exact names Ray's
metrics agent gives them; the Grafana provisioning and the Prometheus config point at the
dashboard folder, the dashboard's datasource and Ray's service-discovery file."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "vla-grpo.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
METRIC_MODULES = [ROOT / "deploy" / "telemetry.py", ROOT / "services" / "policy_service.py"]


def declared_metrics() -> dict[str, tuple[str, tuple, list]]:
    """name -> (kind, tag keys, histogram boundaries) of every ray.util.metrics metric the code
    declares: deploy.telemetry.GAUGES, plus the literal Gauge/Counter/Histogram calls."""
    from deploy.telemetry import GAUGES

    out = {name: ("Gauge", (), []) for name, _ in GAUGES.values()}
    for path in METRIC_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("Gauge", "Counter", "Histogram")
                    and node.args and isinstance(node.args[0], ast.Constant)):
                kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg in ("tag_keys", "boundaries")}
                out[node.args[0].value] = (node.func.attr, tuple(kw.get("tag_keys") or ()), list(kw.get("boundaries") or []))
    return out


# Runs in a child process: Ray's recorder installs a global OpenTelemetry meter provider and
# registers with prometheus_client's global registry, which must not leak into the test session.
_EXPORT_SCRIPT = """
import json, sys
from prometheus_client import REGISTRY
from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder

recorder = OpenTelemetryMetricRecorder()   # what each node's metrics agent exports through
for name, (kind, tags, bounds) in json.loads(sys.stdin.read()).items():
    values = {t: "x" for t in tags}
    if kind == "Histogram":
        recorder.register_histogram_metric(name, "d", bounds)
        recorder.record_histogram_aggregated_batch(name, [{"tags": values, "bucket_counts": [1] * (len(bounds) + 1)}])
    else:
        (recorder.register_gauge_metric if kind == "Gauge" else recorder.register_counter_metric)(name, "d")
        recorder.set_metric_value(name, values, 1.0)
print(json.dumps(sorted({s.name for family in REGISTRY.collect() for s in family.samples})))
"""


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """The Prometheus sample names Ray 2.60 exports for the declared metrics (`ray_` prefix,
    counters keep one `_total`, histograms get `_bucket`/`_sum`/`_count`), produced by Ray's own
    exporter rather than re-derived by hand."""
    declared = declared_metrics()
    proc = subprocess.run([sys.executable, "-c", _EXPORT_SCRIPT], input=json.dumps(declared),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {n for n in names if n.startswith("ray_vla_")}


def test_ray_exports_every_declared_metric_under_its_prefixed_name(exported):
    from ray._private.telemetry.open_telemetry_metric_recorder import NAMESPACE

    declared = declared_metrics()
    assert {"vla_task_success_rate_ratio", "vla_env_steps_total", "vla_inference_batch_size",
            "vla_inference_latency_seconds"} <= set(declared)
    expected = set()
    for name, (kind, _, _) in declared.items():
        base = f"{NAMESPACE}_{name}"
        expected |= {base + s for s in ("_bucket", "_sum", "_count")} if kind == "Histogram" else {base}
    assert exported == expected
    assert "ray_vla_env_steps_total" in exported and "ray_vla_env_steps_total_total" not in exported


# ------------------------------------------------------------------------------- PromQL
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, aggregations,
    keywords, labels (in {...}, by/without/on/ignoring lists) or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if m.start() and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # exponent of a number, e.g. 1e3
        if e[m.end():].lstrip().startswith("(") or m.group().lower() in _NOT_METRICS:
            continue
        names.add(m.group())
    return names


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, pod) (rate(ray_a_bucket{x=~"$v", y="by(z)"}[$__rate_interval])))'
            ' / on(job) group_left max without (instance) (ray_b) > 1e3 and ray_c offset 5m')
    assert metric_names(expr) == {"ray_a_bucket", "ray_b", "ray_c"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def _queries(dash):
    """(where, PromQL) of every panel target and every query variable."""
    for p in _panels(dash):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r}/{t.get('refId')}", t.get("expr", "")
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*\w+\s*\)\s*", q)
            yield f"variable {v['name']}", m.group(1) if m else q


def unknown_metrics(dash, exported) -> list[str]:
    return [f"{where}: {sorted(metric_names(q) - exported)}" for where, q in _queries(dash)
            if not metric_names(q) or metric_names(q) - exported]


def test_every_panel_has_a_prometheus_query():
    dash = _dashboard()
    panels = [p for p in _panels(dash) if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in _panels(dash)}) == len(list(_panels(dash)))
    for p in panels:
        assert p.get("targets") and all(t.get("expr", "").strip() for t in p["targets"]), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]


def test_every_query_uses_exported_metrics_only(exported):
    assert unknown_metrics(_dashboard(), exported) == []


def test_dashboard_covers_the_operations_view(exported):
    used = set().union(*(metric_names(q) for _, q in _queries(_dashboard())))
    wanted = ["env_steps_per_second", "env_steps_total", "success_rate_ratio", "task_success_rate_ratio",
              "loss", "clip_fraction_ratio", "entropy_nats", "grad_norm", "queue_depth_items",
              "policy_lag_versions", "weight_sync_seconds", "filtered_group_ratio",
              "inference_latency_seconds_bucket", "inference_batch_size_sum", "inference_batch_size_count"]
    assert not [w for w in wanted if f"ray_vla_{w}" not in used]
    assert any("histogram_quantile" in q and "ray_vla_inference_latency_seconds_bucket" in q for _, q in _queries(_dashboard()))
    assert any('task' in t.get("legendFormat", "") for p in _panels(_dashboard()) for t in p.get("targets", []))


def test_check_catches_names_ray_does_not_export(exported):
    dash = _dashboard()
    panel = next(p for p in _panels(dash) if p.get("targets"))
    for bad in ("max(vla_loss)",                       # the declared name, without Ray's prefix
                "rate(ray_vla_env_steps_total_total[5m])",  # a second counter suffix
                "ray_vla_inference_latency_seconds",   # a histogram has no bare series
                "sum(rate(ray_vla_not_a_metric[5m]))"):
        panel["targets"] = [{"refId": "A", "expr": bad}]
        assert unknown_metrics(dash, exported), bad


# ------------------------------------------------------------------------------- provisioning
def _docs_mount(source: str) -> str:
    """The container path that docs/operations.md mounts a repo folder on (`-v $PWD/<source>:<path>`)."""
    found = re.findall(rf"\$PWD/{re.escape(source)}:(/[^\s:]+)", OPERATIONS.read_text())
    assert found, f"docs/operations.md does not mount {source}"
    assert len(set(found)) == 1, found
    return found[0]


def test_dashboard_provider_points_at_the_dashboard_folder():
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "vla-grpo.yml").read_text())["providers"]
    (provider,) = providers
    assert provider["type"] == "file"
    assert provider["options"]["path"] == _docs_mount("deploy/grafana/dashboards")
    assert DASHBOARD.parent == DASHBOARDS and sorted(p.name for p in DASHBOARDS.glob("*.json")) == ["vla-grpo.json"]
    assert _docs_mount("deploy/grafana/provisioning") == "/etc/grafana/provisioning"


def test_datasource_is_the_one_the_dashboard_uses():
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    dash = _dashboard()
    var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert var["query"] == source["type"] == "prometheus"
    assert (var["current"]["text"], var["current"]["value"]) == (source["name"], source["uid"])
    refs = [p["datasource"] for p in _panels(dash) if "datasource" in p]
    refs += [t["datasource"] for p in _panels(dash) for t in p.get("targets", []) if "datasource" in t]
    refs += [v["datasource"] for v in dash["templating"]["list"] if "datasource" in v]
    allowed = {("prometheus", "${" + var["name"] + "}"), ("prometheus", source["uid"])}
    assert refs and {(r["type"], r["uid"]) for r in refs} <= allowed


def test_prometheus_scrapes_rays_discovery_file_and_the_local_port():
    from ray._private import ray_constants

    from common.config import LoggingConfig

    cfg = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    files = [f for j in jobs.values() for sd in j.get("file_sd_configs", []) for f in sd["files"]]
    assert files == [f"/tmp/ray/{ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    targets = [t for j in jobs.values() for sc in j.get("static_configs", []) for t in sc["targets"]]
    assert targets
    for t in targets:  # a port `logging.metrics_port=` accepts, and the one the docs use
        port = int(t.rsplit(":", 1)[1])
        LoggingConfig(metrics_port=port)
        assert f"logging.metrics_port={port}" in OPERATIONS.read_text()
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["jsonData"]["timeInterval"] == cfg["global"]["scrape_interval"]
