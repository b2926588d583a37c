"""This machine's own limits, the yardsticks for the other benches; prints one JSON object.

    python bench/machine.py [--threads 2] [--seconds 1.0] [--device cpu|cuda]

- matmul GFLOP/s in float32 and bfloat16 at the shapes of the VoxCPM1.5 stacks (hidden 1024, FFN 4096,
  128 to 576 rows), through torch's default path (MKL sgemm for float32 on CPU), oneDNN (what
  voxcpm_core.cpu.kernels uses for float32) and oneDNN on prepacked weights (what generation uses
  with ``pack_weights``); ``peak_gflops`` is the best of all.
- weight streaming GB/s: matrix-vector products (1 and 2 rows, as in generation with CFG) over
  512 MiB of weights, far more than the caches, in float32 and bfloat16, through the same paths:
  bytes of weights read per second; ``peak_gbs`` is the best path.

On CUDA there is one path (torch's own, TF32 off) and the same shapes and bytes.

Other benches import ``measure_limits`` and print their figures beside these.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from voxcpm_core.cpu.capability import cpu
from voxcpm_core.cpu.kernels import PackedWeight, onednn_mm

HIDDEN, FFN = 1024, 4096
MATMUL_SHAPES = [(128, HIDDEN, FFN), (128, FFN, HIDDEN), (576, HIDDEN, FFN), (576, FFN, HIDDEN)]  # (M, K, N)
STREAM_BYTES = 512 * 2**20  # weights streamed per matrix-vector pass
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, budget_s: float, device: torch.device = CPU) -> float:
    """Seconds per call of ``fn``, averaged over ``budget_s`` after three warm-up calls (queued work included)."""
    for _ in range(3):
        fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(8):  # queued on a GPU, which is synchronised after each group
            fn()
        calls += 8
        synchronize(device)
        if (elapsed := time.perf_counter() - start) >= budget_s:
            return elapsed / calls


def skipped_paths(dtype: torch.dtype, device: torch.device) -> dict[str, str]:
    """The oneDNN paths of ``dtype`` this CPU has no kernel for: name -> why."""
    if device.type != "cpu":
        return {}
    cap = cpu()
    why = None if cap.onednn else "torch was built without oneDNN linear kernels"
    if why is None and dtype == torch.bfloat16 and not cap.onednn_bf16:
        why = f"oneDNN has no bfloat16 linear kernel on this CPU ({cap.describe()})"
    return {} if why is None else {"onednn": why, "onednn_packed": why}


def _paths(dtype: torch.dtype, device: torch.device) -> dict:
    """name -> (prepare weight, matmul(x, prepared weight)) for every matmul path of ``dtype`` that runs on ``device``."""
    paths = {"default": (lambda w: w, F.linear)}
    if device.type == "cpu":
        paths["onednn"] = (lambda w: w, onednn_mm)
        paths["onednn_packed"] = (lambda w: PackedWeight().get(w), onednn_mm)
    skipped = skipped_paths(dtype, device)
    return {name: path for name, path in paths.items() if name not in skipped}


def matmul_gflops(dtype: torch.dtype, budget_s: float, device: torch.device = CPU) -> dict:
    """GFLOP/s of x [M, K] @ W [N, K]^T per shape and path, and the best of them."""
    rows, peak = [], 0.0
    for M, K, N in MATMUL_SHAPES:
        x, w = torch.randn(M, K, device=device).to(dtype), torch.randn(N, K, device=device).to(dtype)
        paths = {name: (lambda x=x, w=prepare(w), mm=mm: mm(x, w)) for name, (prepare, mm) in _paths(dtype, device).items()}
        row = {"shape_mkn": [M, K, N]}
        for name, fn in paths.items():
            row[f"{name}_gflops"] = 2 * M * K * N / seconds_per_call(fn, budget_s, device) / 1e9
            peak = max(peak, row[f"{name}_gflops"])
        rows.append(row)
    return {"peak_gflops": peak, "shapes": rows}


def weight_stream_gbs(dtype: torch.dtype, budget_s: float, rows: int, device: torch.device = CPU) -> dict:
    """GB/s of weights read by [rows, K] @ W^T over STREAM_BYTES of [FFN, HIDDEN] matrices."""
    size = torch.tensor([], dtype=dtype).element_size()
    count = STREAM_BYTES // (FFN * HIDDEN * size)
    weights = [torch.randn(FFN, HIDDEN, device=device).to(dtype) for _ in range(count)]
    x = torch.randn(rows, HIDDEN, device=device).to(dtype)
    found = {}
    for name, (prepare, mm) in _paths(dtype, device).items():
        prepared = [prepare(w) for w in weights]
        calls = lambda mm=mm, ws=prepared: [mm(x, w) for w in ws]  # noqa: E731
        found[f"{name}_gbs"] = STREAM_BYTES / seconds_per_call(calls, budget_s, device) / 1e9
        del prepared
    return {"rows": rows, "peak_gbs": max(found.values()), **found}


def measure_limits(threads: int = 2, budget_s: float = 1.0, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    out = {"threads": threads, "device": device_name(dev), "cpu": cpu().to_dict(), "skipped_paths": {}}
    for name, dtype in DTYPES.items():
        out[f"matmul_{name}"] = matmul_gflops(dtype, budget_s, dev)
        out[f"stream_{name}"] = [weight_stream_gbs(dtype, budget_s, rows, dev) for rows in (1, 2)]
        if skipped := skipped_paths(dtype, dev):
            out["skipped_paths"][name] = skipped
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def summary(limits: dict) -> dict:
    """The four headline limits: matmul GFLOP/s and weight-streaming GB/s (1 row), float32 and bfloat16."""
    return {
        "matmul_gflops_float32": limits["matmul_float32"]["peak_gflops"],
        "matmul_gflops_bfloat16": limits["matmul_bfloat16"]["peak_gflops"],
        "stream_gbs_float32": limits["stream_float32"][0]["peak_gbs"],
        "stream_gbs_bfloat16": limits["stream_bfloat16"][0]["peak_gbs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per figure")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    limits = measure_limits(args.threads, args.seconds, args.device)
    print(json.dumps({"torch": torch.__version__, "summary": summary(limits), **limits}, indent=1))


if __name__ == "__main__":
    main()
