"""
Which number format a run computes in, decided by measuring the machine, and the one kernel
whose speed breaks the rule on the CPU.

    default_dtype(device)   "auto": bf16 on CUDA and on CPUs whose bf16 matmuls are fast, else fp32
    cpu_peak_flops(dtype)   a CPU's measured matmul rate (also the MFU denominator on the CPU)
    sdpa(q, k, v)           attention, in fp32 on the CPU under bf16 autocast

Ours: papers and reference repos train in bf16 on GPUs and say nothing of CPUs. On a CPU with
AVX512-BF16 or AMX, bf16 matmuls run several times faster than fp32 ones (about 4x on this
repo's 2-core AMD EPYC: README, "bf16 on this CPU"); on CPUs without them bf16 is emulated and
slower, so the default is measured rather than assumed.
"""
import functools
import time

import torch
import torch.nn.functional as F

FAST_BF16 = 1.5   # a CPU computes in bf16 by default when its bf16 matmuls are this much faster


def default_dtype(device: torch.device) -> str:
    """What "auto" trains and evaluates in: bf16 on CUDA, and on a CPU whose bf16 matmuls
    measure at least FAST_BF16 times as fast as its fp32 ones; fp32 on other CPUs."""
    if device.type == "cuda":
        return "bf16"
    threads = torch.get_num_threads()
    fast = cpu_peak_flops("bf16", threads) >= FAST_BF16 * cpu_peak_flops("fp32", threads)
    return "bf16" if fast else "fp32"


@functools.cache
def cpu_peak_flops(dtype: str, threads: int) -> float:
    """The best of a few 2048^3 matmuls in the dtype, after warm-ups: measured once per
    process for each dtype and thread count (it takes about 2 s on one thread)."""
    t = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = 2048
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    a, b = (torch.randn(n, n, generator=gen).to(t) for _ in range(2))
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def sdpa(q, k, v, **kw):
    """F.scaled_dot_product_attention, in fp32 on the CPU under bf16 autocast: there its bf16
    kernels are slower than fp32's (forward + backward at stage 2's shapes, 9.2 ms against
    2.6, on this repo's 2-core CPU), while the matmuls around them are faster in bf16."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
