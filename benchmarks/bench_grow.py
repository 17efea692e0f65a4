"""SpIEL growth selection: MA (accumulator products) and AG (top-|grad| candidates), GPU only.

    PYTHONPATH=python:. python benchmarks/bench_grow.py [--ma-only]

MA: exact top products without the m·n buffer vs the published outer product + masks + arange +
top-k. AG: per-tile top candidates inside the dW tile GEMM vs a dense dW GEMM alone (and vs dense
dW + top-k of abs, the published way).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_ms, extra_peak_mib, print_table

from sparse_kernels.grow import grad_topk_candidates, ma_select
from spft.reference import grow as R

M, N, T = 11008, 4096, 4096
DENSITY = 0.01


def _ma_profile(fn, reps: int = 20) -> None:
    """Where MA selection's time goes: host time per call (launch overhead) and the
    per-kernel device time from torch.profiler."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t_host = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t0) / reps * 1e3
    print(f"\nMA host time per call (enqueue only): {t_host:.3f} ms; enqueue + run: "
          f"{t_all:.3f} ms")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def _ma_case(m: int, n: int, gen: torch.Generator):
    """Random accumulators and DENSITY·m·n sorted unique int32 active indices; grow 20% of k."""
    k = round(DENSITY * m * n)
    active = torch.unique(torch.randint(0, m * n, (k + k // 10,), device="cuda",
                                        generator=gen))[:k]
    active = active[torch.randperm(active.numel(), device="cuda", generator=gen)[:k]]
    active = active.sort().values.to(torch.int32)
    grow = round(0.2 * active.numel())
    row = torch.rand(m, device="cuda", generator=gen)
    col = torch.rand(n, device="cuda", generator=gen)
    return row, col, active, grow


def _ma_row(m: int, n: int, row, col, active, grow) -> list[str]:
    ours = ma_select(row, col, active, grow)
    brute = R.ma_select(row, col, active, grow)
    pub = R.ma_select_published(row, col, active, grow)
    assert torch.equal(ours, brute), "fused MA selection differs from the brute force"
    print(f"MA {m}x{n}: fused == brute force: True; == published (as sets): "
          f"{torch.equal(ours, pub)}")
    del ours, brute, pub
    t_pub = bench_ms(lambda: R.ma_select_published(row, col, active, grow))
    t_ours = bench_ms(lambda: ma_select(row, col, active, grow))
    mem_pub = extra_peak_mib(lambda: R.ma_select_published(row, col, active, grow))
    mem_ours = extra_peak_mib(lambda: ma_select(row, col, active, grow))
    return [f"MA selection {m}x{n}, k={active.numel()}, grow {grow}", f"{t_pub:.3f}",
            f"{t_ours:.3f}", f"{t_pub / t_ours:.1f}x (≥ 5x)", f"{mem_pub:.0f}",
            f"{mem_ours:.1f}", f"{100 * mem_ours / mem_pub:.2f}% (≤ 5%)"]


def main() -> None:
    dev = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    row, col, active, grow = _ma_case(M, N, gen)
    rows = [_ma_row(M, N, row, col, active, grow),
            _ma_row(N, M, *_ma_case(N, M, torch.Generator(device="cuda").manual_seed(1)))]
    print_table(f"SpIEL-MA growth ({dev})", ["what", "reference ms", "spft ms", "speed-up",
                                              "ref extra MiB", "spft extra MiB", "ratio"], rows)
    _ma_profile(lambda: ma_select(row, col, active, grow))
    if "--ma-only" in sys.argv:
        return

    # ---------------------------------------------------------------- AG
    dy = torch.randn(T, M, device="cuda", dtype=torch.bfloat16, generator=gen)
    x = torch.randn(T, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    n_cand = 2 * grow
    want_idx, _ = R.ag_candidates(dy, x, n_cand)
    t_gemm = bench_ms(lambda: dy.t() @ x)
    t_pub = bench_ms(lambda: R.ag_candidates(dy, x, n_cand))
    rows = []
    for per_seg, (bm, bn, nw, ns) in ((1, (128, 256, 8, 3)), (2, (128, 256, 8, 3)),
                                      (4, (128, 128, 8, 3))):
        kw = dict(per_segment=per_seg, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        try:
            idx, _, exact = grad_topk_candidates(dy, x, n_cand, **kw)
        except Exception as e:
            print(f"config {kw} failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        overlap = torch.isin(idx, want_idx).float().mean().item()
        t = bench_ms(lambda kw=kw: grad_topk_candidates(dy, x, n_cand, **kw))
        mem = extra_peak_mib(lambda kw=kw: grad_topk_candidates(dy, x, n_cand, **kw))
        rows.append([f"tile {bm}x{bn} w{nw} s{ns}, {per_seg}/segment", f"{t_gemm:.3f}",
                     f"{t:.3f}", f"{t / t_gemm:.2f}x (≤ 1.1x)", f"{t_pub:.3f}",
                     f"{mem:.0f}", f"{overlap:.4f}", str(exact)])
    mem_dense = extra_peak_mib(lambda: R.ag_candidates(dy, x, n_cand))
    print_table(f"SpIEL-AG candidates, dW 11008x4096 from T={T}, {n_cand} candidates ({dev}); "
                f"published dense dW + topk extra MiB: {mem_dense:.0f}",
                ["config", "dense dW GEMM ms", "spft ms", "vs GEMM", "published ms",
                 "spft extra MiB", "overlap w/ exact top-k", "exact flag"], rows)


if __name__ == "__main__":
    main()
