"""What one benchmark phase costs the machine: wall time, the CPU time of every process on it
(psutil; run the benchmark alone), split by role (Ray actor class, or program name), the GPU's
utilisation, sampled while the phase runs, and the host memory in use at its end.

GPU utilisation is NVML's `utilization.gpu` (the share of the last sample period in which any
kernel ran), read through pynvml where it imports, else from `nvidia-smi --loop-ms` in a subprocess;
None on a machine without either (a CPU box)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter

import psutil

SAMPLE_MS = 200


def busy_seconds() -> float:
    """CPU seconds of the whole machine, all but idle. Ray's workers run niced (their time is
    `nice`, not `user`); guest time is already inside user/nice on Linux."""
    times = psutil.cpu_times()
    skip = ("idle", "iowait", "guest", "guest_nice")
    return sum(getattr(times, f) for f in times._fields if f not in skip)


def role(cmdline: list[str]) -> str:
    """A process's role: its Ray actor or task class (Ray sets the title `ray::EnvWorker.method`,
    `ray::ServeReplica:app:deployment`, `ray::IDLE`), else its program's name (raylet, gcs_server,
    python3: the benchmark's own process)."""
    title = " ".join(cmdline)
    if match := re.match(r"ray::(\w+)", title):
        return match.group(1)
    return os.path.basename(cmdline[0]) if cmdline else "?"


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """{pid: (role, user + system CPU seconds so far)} of every process that can be read."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        times, cmdline = proc.info["cpu_times"], proc.info["cmdline"]
        if times is not None:
            out[proc.pid] = (role(cmdline or []), times.user + times.system)
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> Counter:
    """CPU seconds per role between two readings; a process started in between counts from zero (one
    that ended in between is lost: its time is only in the machine-wide figure)."""
    spent: Counter = Counter()
    for pid, (name, seconds) in after.items():
        spent[name] += seconds - before.get(pid, (name, 0.0))[1]
    return spent


class GpuSampler:
    """Samples GPU 0's utilisation every SAMPLE_MS in a thread, between start() and stop()."""

    def __init__(self):
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> "GpuSampler":
        read = self._nvml()
        if read is not None:
            self.source = "pynvml"
            self._thread = threading.Thread(target=self._poll, args=(read,), daemon=True)
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"--loop-ms={SAMPLE_MS}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_lines, daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    @staticmethod
    def _nvml():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # not installed, or no driver: try nvidia-smi
            return None

    def _poll(self, read) -> None:
        while not self._stop.wait(SAMPLE_MS / 1000):
            self.samples.append(read())

    def _read_lines(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def stop(self) -> dict | None:
        """{'mean_pct', 'max_pct', 'samples', 'source'}, or None where nothing could be read."""
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.samples:
            return None
        return {"mean_pct": sum(self.samples) / len(self.samples), "max_pct": max(self.samples),
                "samples": len(self.samples), "source": self.source}


class PhaseMeter:
    """with PhaseMeter() as m: <run the phase>; then m.figures(env_steps)."""

    def __enter__(self) -> "PhaseMeter":
        self.gpu = GpuSampler().start()
        self.processes = cpu_by_process()
        self.busy = busy_seconds()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.busy = busy_seconds() - self.busy
        self.by_role = cpu_by_role(self.processes, cpu_by_process())
        self.gpu_util = self.gpu.stop()
        memory = psutil.virtual_memory()  # every role still up: what more envs or workers would add to
        self.host_memory = {"used_gib": (memory.total - memory.available) / 2**30, "total_gib": memory.total / 2**30}

    def figures(self, env_steps: int) -> dict:
        return {"env_steps": env_steps, "seconds": self.seconds, "env_steps_per_s": env_steps / self.seconds,
                "cpu_ms_per_env_step": 1000 * self.busy / max(env_steps, 1),
                "cpu_busy_fraction": self.busy / self.seconds / psutil.cpu_count(),
                # where that CPU went (ms per env step by role, the largest first; roles under 0.05 ms left out)
                "cpu_ms_per_env_step_by_role": {name: 1000 * sec / max(env_steps, 1)
                                                for name, sec in self.by_role.most_common()
                                                if 1000 * sec / max(env_steps, 1) >= 0.05},
                "gpu_util": self.gpu_util, "host_memory": self.host_memory}
