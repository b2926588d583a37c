"""Measuring helpers shared by the benches, ours and the reference's (bench/reference.py runs in another
virtual environment, so this module imports nothing of the project and nothing beyond the standard library)."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
# VoxCPM2's release tokenizer files could not be obtained; its vocabulary is VoxCPM1.5's
# (voxcpm2-architecture.md, section 9), so a model folder without them borrows these
FALLBACK_TOKENIZER_DIR = SHARED / "models" / "VoxCPM1.5"


def tokenizer_dir(model_dir: Path) -> Path:
    """Where the benches read the tokenizer files: ``model_dir`` if it has tokenizer.json, else VoxCPM1.5's."""
    return model_dir if (model_dir / "tokenizer.json").is_file() else FALLBACK_TOKENIZER_DIR


_peak_before_restart = 0.0  # the process's peak when PeakRSS last restarted the kernel's count


def peak_rss_gib() -> float:
    """This process's peak resident memory so far."""
    # ru_maxrss is the kernel's high-water mark, which PeakRSS.start() restarts
    return max(_peak_before_restart, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # Linux: KiB


class PeakRSS:
    """This process's peak resident memory from start() on: Linux's VmHWM, restarted from the current RSS.

    Building random weights (and rounding them to another dtype) peaks above what generating needs, and
    both sides of a comparison build differently; counting from after the build compares generation alone.
    ``gib()`` is None where the kernel does not let the count restart (not Linux, or before 4.0).
    """

    def start(self) -> None:
        global _peak_before_restart
        _peak_before_restart = peak_rss_gib()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": restart the peak (VmHWM, ru_maxrss) at the RSS
            self.started = True
        except OSError:
            self.started = False

    def gib(self) -> float | None:
        if not self.started:
            return None
        kib = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1)
        return int(kib) / 2**20


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


def _as_generate_run(run: dict) -> dict:
    """A "gentime" run of refperf_voxcpm2_cpu2t.json (tools/gentime.py: generation from a loaded release-layout
    folder) in the layout of bench/reference.py's "generate" runs; it stored no per-patch median."""
    return {
        "mode": "generate",
        "dtype": run["dtype"],
        "patches": run["patches"],
        "inference_timesteps": run["timesteps"],
        "audio_seconds": run["audio_s"],
        "s_per_patch_ar": run["s_per_patch_ar"],  # prefill included, decode excluded, as ours
        "s_per_patch_median": None,
        "decode_s": run["decode_s"],
        "total_s": run["gen_s"],
        "rtf_total": run["gen_s"] / run["audio_s"],
        "peak_rss_gib": run["peak_rss_gib"],  # while loading: the float32 model and the bf16 state dict
        "peak_rss_generate_gib": run["peak_rss_gen_gib"],  # after loading
    }


def reference_runs(file: Path, python: str | None, modes: list[str], args: list[str],
                   dtype: str = "float32") -> tuple[dict, dict]:
    """The reference implementation's runs by mode in ``dtype`` (its training runs are float32), and where they came from.

    With ``python`` (an interpreter that has voxcpm==2.0.3) bench/reference.py measures ``modes`` now, in
    this invocation, under this process's environment (so under the same ISA caps); otherwise they are read
    from ``file`` (a bench/reference.py output or a refperf JSON of the fixtures, where a run without a dtype
    is float32 and a repeated run does not replace the first). ({}, {...}) when neither exists.
    """
    if python:
        script = str(Path(__file__).with_name("reference.py"))
        proc = subprocess.run([python, script, "--runs", *modes, *args, "--dtype", dtype], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench/reference.py with {python} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        data, source = json.loads(proc.stdout), {"measured_now_with": python}
    elif file.is_file():
        data, source = json.loads(file.read_text()), {"file": str(file)}
    else:
        return {}, {"missing": str(file)}
    keep = ("versions", "cpu_flags", "isa_caps", "torch_cpu_capability")
    runs = {}
    for run in data["runs"]:
        run = _as_generate_run(run) if run["mode"] == "gentime" else run
        if run.get("dtype", "float32") == dtype:
            runs.setdefault(run["mode"], run)  # a later run of a mode is a repeat
    return runs, source | {k: data[k] for k in keep if k in data}
