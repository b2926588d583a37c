"""Time `voxcpm data validate` on a large manifest over real WAV files; prints one JSON object.

    python bench/validate.py [--lines 10000] [--workers N] [--deep]

Builds the clips and the manifest in a temporary folder (removed afterwards): mono 16 kHz clips of
0.4-1.2 s, with a few 22.05 kHz and stereo files and missing paths mixed in, as in real data.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from voxcpm_core.data.validate import default_workers, validate_manifest


def _clip(seconds: float, sample_rate: int, channels: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    wav = 0.1 * rng.standard_normal((round(seconds * sample_rate), channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wav, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def build(folder: Path, lines: int) -> Path:
    """``lines`` distinct clip files and a manifest naming each once (1 % missing)."""
    templates = [_clip(0.4 + 0.1 * k, 16000, 1, k) for k in range(9)]
    templates += [_clip(1.0, 22050, 1, 100), _clip(1.0, 16000, 2, 101)]
    (folder / "clips").mkdir()
    rows = []
    for i in range(lines):
        name = f"clips/{i:06d}.wav"
        if i % 100 != 99:  # every 100th file is missing
            (folder / name).write_bytes(templates[i % len(templates)])
        rows.append(
            json.dumps({"audio": name, "text": f"Sample number {i} of the benchmark.", "dataset_id": i % 3})
        )
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--deep", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="voxcpm-bench-") as tmp:
        start = time.perf_counter()
        manifest = build(Path(tmp), args.lines)
        build_s = time.perf_counter() - start

        start = time.perf_counter()
        report = validate_manifest(manifest, sample_rate=16000, deep=args.deep, workers=args.workers)
        engine_s = time.perf_counter() - start

        start = time.perf_counter()
        cli = [
            sys.executable,
            "-m",
            "voxcpm_cli",
            "data",
            "validate",
            str(manifest),
            "--sample-rate",
            "16000",
        ]
        cli += ["--json", "--workers", str(args.workers)] + (["--deep"] if args.deep else [])
        proc = subprocess.run(cli, capture_output=True, text=True)
        cli_s = time.perf_counter() - start

    result = {
        "lines": args.lines,
        "workers": args.workers,
        "deep": args.deep,
        "build_s": round(build_s, 3),
        "validate_s": round(engine_s, 3),
        "lines_per_s": round(args.lines / engine_s),
        "cli_s": round(cli_s, 3),
        "cli_exit_code": proc.returncode,
        "errors": len(report.errors),
        "warnings": len(report.warnings),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
