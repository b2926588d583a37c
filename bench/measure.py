"""Measuring helpers shared by the benches, ours and the reference's (bench/reference.py runs in another
virtual environment, so this module imports nothing of the project and nothing beyond the standard library)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_gib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class OtherLoad:
    """Cores used by other processes between start() and stop(), from /proc/stat minus this process."""

    @staticmethod
    def _busy_s() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    @staticmethod
    def _own_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy_s(), self._own_s()

    def stop(self) -> float:
        wall = time.perf_counter() - self.t0
        return max(0.0, (self._busy_s() - self.busy0) - (self._own_s() - self.own0)) / wall


def run_child(script: str, args: list[str]) -> dict:
    """Run ``script`` again in a fresh process (its peak RSS is its own) and read the JSON of its last line."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{Path(script).name} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_runs(file: Path, python: str | None, modes: list[str], args: list[str]) -> tuple[dict, dict]:
    """The reference implementation's runs by mode, and where they came from.

    With ``python`` (an interpreter that has voxcpm==2.0.3) bench/reference.py measures ``modes`` now, in
    this invocation, under this process's environment (so under the same ISA caps); otherwise they are read
    from ``file`` (a bench/reference.py output or the fixture's refperf JSON). ({}, {...}) when neither exists.
    """
    if python:
        script = str(Path(__file__).with_name("reference.py"))
        proc = subprocess.run([python, script, "--runs", *modes, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench/reference.py with {python} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        data, source = json.loads(proc.stdout), {"measured_now_with": python}
    elif file.is_file():
        data, source = json.loads(file.read_text()), {"file": str(file)}
    else:
        return {}, {"missing": str(file)}
    keep = ("versions", "cpu_flags", "isa_caps", "torch_cpu_capability")
    return {run["mode"]: run for run in data["runs"]}, source | {k: data[k] for k in keep if k in data}
