"""`vla-grpo` runs as Ray jobs (`ray job submit`), and a throwaway Ray head on this machine to submit
them to (the integration tests; also handy to try a submission before using a real cluster).

    token = secrets.token_urlsafe(32)
    head = LocalHead(num_cpus=2, metrics_export_port=free_port(), token=token).start()
    try:
        job = submit(head.dashboard_url, job_entrypoint("train", "configs/tiny.yaml", ["policy.path=/abs/policy"]),
                     token=token)
        status, logs = wait_for_job(head.dashboard_url, job, timeout_s=240, token=token)
    finally:
        head.stop()

The head is a `ray start --head --block` child in its own session and temp dir, on free ports, so it
neither joins nor disturbs any other Ray instance here. With `token` it runs with Ray's token
authentication on, as a deployed cluster does (k8s/); without, it is off, like the CLI's private
clusters. Clients pass the same `token` (`submit`, `wait_for_job`, `auth_headers`). `stop()` ends
exactly its processes (the `ray start` process tree, snapshotted before the SIGTERM); `ray stop` is
never used because it kills every Ray process on the machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what `--working-dir <repo>` must not upload (ray also honours .gitignore)
JOB_EXCLUDES = [".venv", "runs", ".git", ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def ray_cli() -> str:
    """The `ray` executable of this interpreter's environment (the venv's, not whatever is on PATH)."""
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_entrypoint(command: str, config: str, overrides: list[str], python: str = "python") -> str:
    """`python -m deploy.cli COMMAND CONFIG overrides...`, run from the job's working dir (a copy of
    the repository, on the driver's sys.path). `python` should be the nodes' venv interpreter:
    the job's shell may find another `python` on PATH first."""
    return shlex.join([python, "-m", "deploy.cli", command, config, *overrides])


def auth_headers(token: str | None) -> dict[str, str]:
    """The header Ray's dashboard (job and state APIs) checks when token authentication is on."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit(address: str, entrypoint: str, working_dir: str | Path = ROOT, excludes: list[str] | None = None,
           submission_id: str | None = None, timeout_s: float = 120, env_vars: dict[str, str] | None = None,
           token: str | None = None) -> str:
    """`ray job submit --no-wait`; returns the submission id. `env_vars` go into the job's runtime env.
    `token`: the cluster's Ray auth token, given to the CLI with RAY_AUTH_MODE=token; without it the
    CLI authenticates as the caller's environment says (or not at all)."""
    import json

    submission_id = submission_id or f"vla-grpo-{uuid.uuid4().hex[:10]}"
    runtime_env = {"excludes": list(JOB_EXCLUDES if excludes is None else excludes)}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    cmd = [ray_cli(), "job", "submit", "--address", address, "--submission-id", submission_id,
           "--working-dir", str(working_dir), "--runtime-env-json", json.dumps(runtime_env), "--no-wait",
           "--", *shlex.split(entrypoint)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"ray job submit failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return submission_id


def wait_for_job(address: str, submission_id: str, timeout_s: float, poll_s: float = 2.0,
                 until=None, token: str | None = None) -> tuple[str, str]:
    """Poll until the job ends (or `until()` returns true, checked each poll); returns (status, logs).
    Raises TimeoutError with the log tail when the deadline passes first."""
    from ray.job_submission import JobSubmissionClient

    # explicit headers: this process's own Ray auth mode (off in tests) says nothing about the head's
    client = JobSubmissionClient(address, headers=auth_headers(token) or None)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL or (until is not None and until()):
            return status, client.get_job_logs(submission_id)
        if time.monotonic() > deadline:
            logs = client.get_job_logs(submission_id)
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f}s; log tail:\n{logs[-4000:]}")
        time.sleep(poll_s)


class LocalHead:
    """A private `ray start --head` on this machine: own temp dir, free ports, dashboard (job API) on.
    `token`: Ray token authentication on with this token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), else
    off. `env`: more variables for the `ray start` process (and so every Ray process of the head)."""

    def __init__(self, num_cpus: int = 2, metrics_export_port: int | None = None, env: dict | None = None,
                 token: str | None = None):
        self.num_cpus = num_cpus
        self.metrics_export_port = metrics_export_port
        self.token = token
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.temp_dir: str | None = None
        self.ports: dict[str, int] = {}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (Path(self.temp_dir) / "ray_start.log").read_text(errors="replace")[-chars:]
        except (OSError, TypeError):
            return ""

    def start(self, timeout_s: float = 90) -> "LocalHead":
        # short path: Ray's unix sockets live under it (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="vgray-", dir="/tmp")
        names = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_http", "agent_grpc", "runtime_env_agent")
        self.ports = {n: free_port() for n in names}
        if self.metrics_export_port:
            self.ports["metrics"] = self.metrics_export_port
        p = self.ports
        cmd = [ray_cli(), "start", "--head", "--block", f"--temp-dir={self.temp_dir}", f"--port={p['gcs']}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dashboard']}",
               f"--ray-client-server-port={p['client']}", f"--node-manager-port={p['node_manager']}",
               f"--object-manager-port={p['object_manager']}", f"--dashboard-agent-listen-port={p['agent_http']}",
               f"--dashboard-agent-grpc-port={p['agent_grpc']}", f"--runtime-env-agent-port={p['runtime_env_agent']}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--disable-usage-stats"]
        if self.metrics_export_port:
            cmd.append(f"--metrics-export-port={self.metrics_export_port}")
        # the mode is set either way: unset, `ray start` would turn auth on if it found a token file
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token} if self.token else {"RAY_AUTH_MODE": "disabled"}
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env.update(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_USAGE_STATS_ENABLED="0")
        env.update({**auth, **self.extra_env})
        log = open(Path(self.temp_dir) / "ray_start.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"ray start exited with {rc}:\n{tail}")
            try:  # the job API answers once the dashboard's job module is up
                probe = urllib.request.Request(f"{self.dashboard_url}/api/jobs/", headers=auth_headers(self.token))
                with urllib.request.urlopen(probe, timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise TimeoutError(f"Ray head's job API not up after {timeout_s:.0f}s:\n{tail}")
            time.sleep(1.0)

    def stop(self, timeout_s: float = 30) -> None:
        import psutil

        if self.proc is not None:
            try:
                root = psutil.Process(self.proc.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # ray start kills its node's processes on SIGTERM
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            _, alive = psutil.wait_procs(tree, timeout=5)
            for proc in alive:  # only the snapshot: each Process checks its pid was not reused
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)
            self.proc = None
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
