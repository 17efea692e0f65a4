"""Sparse-delta linear on the H100: LLaMA-2-7B up_proj (4096 -> 11008), 4096 tokens, bf16.

pytest:  pytest benchmarks/bench_sparse_delta.py --benchmark-only
table:   python benchmarks/bench_sparse_delta.py   (prints markdown tables for RESULTS.md)

Compared in one run: the published algorithm (clone + scatter_add + linear; dense dW + gather in
backward), a dense frozen linear (dx only), a dense trainable linear, LoRA with the same trainable
count, and spft's materialising and merged-in-place modes. Outputs are checked before timing.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_ms, extra_peak_mib, print_table

import spft.ops as ops
from spft.nn import sample_unique_indices
from spft.reference import sparse_delta as ref

IN, OUT, TOKENS = 4096, 11008, 4096
DENSITIES = (0.001, 0.01, 0.03)


def make_case(density: float, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(TOKENS, IN, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(OUT, IN, device="cuda", dtype=dtype, generator=g) * IN**-0.5
    k = int(density * IN * OUT)
    idx = sample_unique_indices(IN * OUT, k, generator=torch.Generator().manual_seed(seed),
                                device="cuda", dtype=torch.int32)
    dv = 0.01 * torch.randn(k, device="cuda", generator=g)
    dy = torch.randn(TOKENS, OUT, device="cuda", dtype=dtype, generator=g)
    return x, w, dv, idx, dy


def fwd_bwd(fn, x, params, dy):
    """One forward + backward producing the gradients of `params` (and of x if it requires)."""
    def run():
        y = fn()
        torch.autograd.backward(y, dy)
        for p in params:
            p.grad = None
        if x.grad is not None:
            x.grad = None
    return run


def configs(density: float):
    x, w, dv, idx, dy = make_case(density)
    xr = x.clone().requires_grad_()
    dvp = dv.clone().requires_grad_()
    w_merged = ops.sparse_delta_materialize(w, dv, idx)
    w_train = w.clone().requires_grad_()
    k = idx.numel()
    rank = max(1, round(k / (IN + OUT)))
    lora_a = (torch.randn(rank, IN, device="cuda", dtype=w.dtype) * 0.01).requires_grad_()
    lora_b = torch.zeros(OUT, rank, device="cuda", dtype=w.dtype).requires_grad_()

    def lora():
        return F.linear(xr, w) + F.linear(F.linear(xr, lora_a), lora_b)

    fwd = {
        "dense F.linear (frozen)": lambda: F.linear(x, w),
        "reference (published)": lambda: ref.sparse_delta_linear_published(x, w, dv, idx),
        "spft materialising": lambda: ops.sparse_delta_linear(x, w, dv, idx,
                                                              check_indices=False),
        "spft merged": lambda: ops.sparse_delta_linear(x, w_merged, dv, idx, merged=True,
                                                       check_indices=False),
    }
    train = {
        "dense frozen (dx only)": fwd_bwd(lambda: F.linear(xr, w), xr, [], dy),
        "dense trainable": fwd_bwd(lambda: F.linear(xr, w_train), xr, [w_train], dy),
        f"LoRA r={rank}": fwd_bwd(lora, xr, [lora_a, lora_b], dy),
        "reference (published)": fwd_bwd(
            lambda: ref.sparse_delta_linear_published(xr, w, dvp, idx), xr, [dvp], dy),
        "spft materialising": fwd_bwd(
            lambda: ops.sparse_delta_linear(xr, w, dvp, idx, check_indices=False), xr, [dvp],
            dy),
        "spft merged": fwd_bwd(
            lambda: ops.sparse_delta_linear(xr, w_merged, dvp, idx, merged=True,
                                            check_indices=False), xr, [dvp], dy),
    }
    return (x, w, dv, idx, dy), fwd, train


def check_outputs(density: float) -> None:
    (x, w, dv, idx, dy), fwd, _ = configs(density)
    expected = fwd["reference (published)"]().float()
    for name in ("spft materialising", "spft merged"):
        err = (fwd[name]().float() - expected).abs().max().item()
        assert err < 0.05, f"{name} forward differs from the reference by {err}"
    xr = x.clone().requires_grad_()
    dvp = dv.clone().requires_grad_()
    ops.sparse_delta_linear(xr, w, dvp, idx).backward(dy)
    dvr = dv.clone().requires_grad_()
    ref.sparse_delta_linear(x.float(), w.float(), dvr, idx).backward(dy.float())
    rel = ((dvp.grad - dvr.grad).norm() / dvr.grad.norm()).item()
    assert rel < 1e-2, f"dv gradient relative error {rel}"


def main() -> None:
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}")
    for density in DENSITIES:
        check_outputs(density)
        (x, w, dv, idx, dy), fwd, train = configs(density)
        k = idx.numel()
        rows = [[n, bench_ms(f)] for n, f in fwd.items()]
        anchor_fwd, ref_fwd = rows[0][1], rows[1][1]
        print_table(f"forward, density {density:.1%} (k={k})", ["impl", "ms", "x dense", "x ref"],
                    [[n, t, t / anchor_fwd, t / ref_fwd] for n, t in rows])
        times = {n: bench_ms(f) for n, f in train.items()}
        mems = {n: extra_peak_mib(f) for n, f in train.items()}
        ref_t = times["reference (published)"]
        print_table(f"forward+backward, density {density:.1%} (k={k})",
                    ["impl", "ms", "x reference", "extra peak MiB"],
                    [[n, t, t / ref_t, mems[n]] for n, t in times.items()])
        # Building blocks: the fused materialisation against HBM bandwidth, the SDDMM
        # strategies against the dense dW GEMM.
        from sparse_kernels.sddmm import sparse_delta_grad
        from sparse_kernels.sparse_delta import sparse_delta_materialize
        out = torch.empty_like(w)
        t_mat = bench_ms(lambda: sparse_delta_materialize(w, dv, idx, out=out))
        minimal_bytes = 2 * w.numel() * w.element_size() + k * (4 + 4 + 2 + 2)
        t_dw = bench_ms(lambda: dy.t() @ x)
        g_ref = sparse_delta_grad(dy, x, idx, IN, strategy="tiles")
        blocks = [["materialise W+scatter(dv)", t_mat,
                   f"{minimal_bytes / t_mat / 1e9:.2f} TB/s"],
                  ["dense dW GEMM (anchor)", t_dw, "-"]]
        for strategy, grad in _grad_strategies(dy, x, idx).items():
            g = grad()
            rel = ((g - g_ref).norm() / g_ref.norm()).item()
            assert rel < 1e-3, f"{strategy} disagrees with tiles: {rel}"
            t = bench_ms(grad)
            blocks.append([f"dv grad, {strategy}", t, f"{t / t_dw:.2f}x dW"])
        print_table(f"building blocks, density {density:.1%}", ["kernel", "ms", "note"], blocks)


def _grad_strategies(dy, x, idx):
    """The dv-gradient kernels by strategy: the Triton ones, and the compiled staged SDDMM
    where `spft._C` is built."""
    from sparse_kernels.sddmm import sparse_delta_grad
    from spft import _backend
    grads = {s: (lambda s=s: sparse_delta_grad(dy, x, idx, IN, strategy=s))
             for s in ("tiles", "sampled")}
    if _backend.extension_has_cuda():
        grads["staged"] = lambda: ops.sparse_delta_grad(dy, x, idx, IN, "staged",
                                                        check_indices=False)
    return grads


# ----------------------------------------------------------------------------- pytest-benchmark
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("impl", ["reference (published)", "spft materialising", "spft merged",
                                  "dense frozen (dx only)"])
def test_bench_fwd_bwd(benchmark, density, impl):
    _, _, train = configs(density)
    benchmark(_synced(train[impl]))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("strategy", ["tiles", "sampled", "staged"])
def test_bench_grad(benchmark, density, strategy):
    x, _, _, idx, dy = make_case(density)
    grads = _grad_strategies(dy, x, idx)
    if strategy not in grads:
        pytest.skip("spft._C is not built with CUDA")
    benchmark(_synced(grads[strategy]))


if __name__ == "__main__":
    main()
