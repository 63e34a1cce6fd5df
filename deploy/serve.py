"""`vla-grpo serve CONFIG policy.path=DIR`: the public HTTP policy API (services/http_api.py) on
a local or existing Ray cluster, until Ctrl-C / SIGTERM. Contract and auth: docs/serving.md."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from common.config import RunConfig


def run_serve(cfg: RunConfig, host: str = "127.0.0.1", port: int = 8000, token_file: str | None = None,
              auth: bool = True, max_batch_size: int = 16) -> None:
    """Serve cfg.policy.path over HTTP. The token comes from `token_file` or $VLA_API_TOKEN;
    without one (and without an explicit auth=False) this refuses to start."""
    import ray
    from ray import serve

    from deploy.runtime import init_ray
    from services.http_api import APP_NAME, start_http_api
    from services.http_auth import resolve_token

    if cfg.policy.path is None:
        sys.exit("serve needs the policy to serve: set policy.path=/local/policy/folder")
    path = Path(cfg.policy.path).expanduser().resolve()
    if not (path / "config.json").is_file():
        sys.exit(f"policy.path={path} is not a policy folder (no config.json)")
    try:
        resolve_token(None, token_file, auth)  # before Ray starts: a missing token is the usual mistake
    except ValueError as e:
        sys.exit(f"serve: {e}")
    started_here = not ray.is_initialized() and not cfg.cluster.address
    init_ray(cfg)
    options = {"num_cpus": cfg.cluster.replica_cpus, "num_gpus": cfg.cluster.replica_gpus}
    if "inference" in cfg.cluster.resources:  # pin replicas to the inference node group, as training does
        options["resources"] = {cfg.cluster.resources["inference"]: 0.001}
    try:
        url = start_http_api(str(path), host, port, token_file=token_file, auth=auth, unnorm_key=cfg.policy.unnorm_key,
                             dtype=cfg.policy.dtype, policy=cfg.policy,
                             num_replicas=cfg.cluster.serve_replicas,
                             max_batch_size=max_batch_size, seed=cfg.seed, **options)
        print(f"policy API ready at {url}  (POST {url}/v1/act, GET {url}/v1/info, GET {url}/healthz; "
              f"auth {'on' if auth else 'OFF'}); Ctrl-C to stop", flush=True)
        _wait_for_interrupt()
    finally:
        try:
            serve.delete(APP_NAME)
        except Exception:
            pass
        if started_here:
            serve.shutdown()
            ray.shutdown()


def _wait_for_interrupt() -> None:
    def _on_sigterm(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)  # k8s / systemd stop like Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the policy API", flush=True)
