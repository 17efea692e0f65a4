"""Where a qSpIEL forward+backward step spends its time (bench_nf4.py's shape and inputs).

    python benchmarks/probe_qspiel_step.py

For spft's qSpIEL op and the published path (bnb dequantize when importable, clone,
scatter_add, linear): the do_bench median of the eager step, the same step replayed from a CUDA
graph (GPU time only, no host gaps), the host time per step without synchronising, and every
CUDA kernel of one profiled step with the sum of their times.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from bench_nf4 import HAS_BNB, IN, TOKENS, _bnb_dequant_fn, _published, _setup
from common import capture_graph, print_kernels
from triton.testing import do_bench

import spft.ops as ops


def host_us_per_step(step, n: int = 50) -> float:
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / n * 1e6


def graphed_ms(step) -> float:
    return do_bench(capture_graph(step).replay, return_mode="median")


def qspiel_steps() -> tuple[Callable, Callable]:
    """bench_nf4's qSpIEL step as (spft's op, the published path): each returns (dx, ddv)."""
    w, q, idx, dv = _setup(double_quant=True)
    x = torch.randn(TOKENS, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(TOKENS, w.shape[0], device="cuda", dtype=torch.bfloat16)
    dvp = dv.clone().requires_grad_()
    dequant = _bnb_dequant_fn(w)[2] if HAS_BNB else ops.nf4_dequantize

    def spft_step():
        y = ops.sparse_delta_linear_nf4(x, q, dvp, idx, check_indices=False)
        return torch.autograd.grad(y, (x, dvp), dy)

    def published_step():
        return torch.autograd.grad(_published(x, q, dvp, idx, dequant), (x, dvp), dy)

    return spft_step, published_step


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; bnb {HAS_BNB}")
    spft_step, published_step = qspiel_steps()
    gx, gdv = spft_step()
    px, pdv = published_step()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print(f"grad check vs published: dx rel {rel(gx, px):.2e}, ddv rel {rel(gdv, pdv):.2e}")
    rows = {}
    for name, step in (("spft qSpIEL", spft_step), ("published", published_step)):
        print(f"  {name}: kernels of one step")
        step()  # warm
        kernels = print_kernels(step)
        eager = do_bench(step, return_mode="median")
        try:
            graphed = graphed_ms(step)
        except Exception as exc:  # capture can fail on a path that syncs: report it
            print(f"    graph capture failed: {exc!r}")
            graphed = float("nan")
        host = host_us_per_step(step)
        rows[name] = (eager, graphed, kernels, host)
    print(f"{'':14} {'eager':>9} {'graphed':>9} {'kernels':>9} {'host/step':>10}")
    for name, (eager, graphed, kernels, host) in rows.items():
        print(f"{name:14} {eager * 1e3:8.1f}u {graphed * 1e3:8.1f}u {kernels:8.1f}u {host:9.1f}u")
    (e_s, g_s, k_s, _), (e_p, g_p, k_p, _) = rows["spft qSpIEL"], rows["published"]
    print(f"spft / published: eager {e_s / e_p:.3f}x, graphed {g_s / g_p:.3f}x, "
          f"kernel sums {k_s / k_p:.3f}x")


if __name__ == "__main__":
    main()
