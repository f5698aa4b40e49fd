"""Peak FLOP/s of the device a run uses, per precision: the denominator of MFU for logs and benches.

GPUs: vendor datasheet numbers for dense math (no 2:4 sparsity), per precision that nanot5 runs the
matmuls in: `bf16`/`fp16` (tensor cores, fp32 accumulate), `tf32` (tensor cores on fp32 tensors) and `fp32`
(CUDA cores; nanot5 turns TF32 off for precision=fp32). A CPU has no datasheet figure that its matmuls
reach, so its peak is measured: large square matmuls in the run's dtype.
"""

from __future__ import annotations

import math
import re
import time

# TFLOP/s, dense. Most specific names first: a pattern matches torch.cuda.get_device_name().
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 ("H100 80GB HBM3")
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16 or tf32 tensor cores
)


def gpu_peak_flops(device_name: str, precision: str) -> float:
    """FLOP/s of a known GPU in `precision` (fp32 | tf32 | bf16 | fp16); NaN if unknown."""
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(precision, math.nan) * 1e12
    return math.nan


def measure_matmul_peak(dtype, n: int = 2048, reps: int = 5) -> float:
    """Best achieved FLOP/s of an n x n x n CPU matmul in `dtype`, through every kernel nanot5's linear
    layers use: torch.mm, and for fp32 also oneDNN (which `model.linear` routes fp32 CPU matmuls to)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    kernels = [lambda: torch.mm(a, b)]
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():  # a @ b.T, exact fp32
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for kernel in kernels:
        kernel()  # warm-up (kernel selection, page faults)
        for _ in range(reps):
            t = time.perf_counter()
            kernel()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def peak_flops(device, precision: str, configured_tflops: float = 0.0) -> float:
    """Peak FLOP/s for MFU: `configured_tflops` if > 0, the GPU table, or a measurement on a CPU.

    precision is the run's (fp32 | tf32 | bf16 | fp16). On a CPU, bf16 runs are measured with bf16
    matmuls and every other precision with fp32 ones (CPUs have no tf32; fp16 autocast is rare there).
    """
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        import torch

        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    import torch

    return measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
