"""Which operand layout and BLAS backend make the qSpIEL step's two GEMMs fastest.

    python benchmarks/probes/gemm_layouts.py

bench_nf4's shape: x [4096, 4096], W [11008, 4096] bf16. The forward is x Wᵀ, the backward's
dx is dy W. The materialised weight can be written as W [out, in] or as Wᵀ [in, out].
"""
import torch
from triton.testing import do_bench

T, OUT, IN = 4096, 11008, 4096


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, IN, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(T, OUT, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(OUT, IN, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    wt = w.t().contiguous()
    ref_y = x.float() @ w.float().t()
    ref_dx = dy.float() @ w.float()
    cases = {
        "fwd F.linear(x, W)": (lambda: torch.nn.functional.linear(x, w), ref_y),
        "fwd x @ Wt (Wt contiguous)": (lambda: x @ wt, ref_y),
        "fwd (Wt.T @ x.T).T i.e. W @ xT": (lambda: (w @ x.t()).t(), ref_y),
        "bwd dy @ W": (lambda: dy @ w, ref_dx),
        "bwd dy @ Wt.T": (lambda: dy @ wt.t(), ref_dx),
        "bwd (W.T @ dy.T).T": (lambda: (w.t() @ dy.t()).t(), ref_dx),
        "dense dW dy.T @ x": (lambda: dy.t() @ x, None),
    }
    for backend in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(backend)
        print(f"-- {backend}")
        for name, (fn, ref) in cases.items():
            out = fn()
            if ref is not None:
                err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
                assert err < 2e-2, (name, err)
            ms = do_bench(fn, warmup=50, rep=300)
            print(f"  {name:34s} {ms * 1e3:8.1f} us")
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
