"""Sweep the small-batch NF4 GEMV kernels on the GPU (LLaMA-2-7B up_proj: 4096 -> 11008).

    python benchmarks/tune_nf4_gemv.py     — checks outputs first, then prints µs per config

Both kernels (`cc`: CUDA cores, `mma`: tensor cores) at 1 / 4 / 16 tokens, NF4 with double
quantisation, blocksize 64, with 1% unmerged deltas; the anchors measured in the same run are a
bf16 `F.linear` on the dequantised weight and `bnb.matmul_4bit` when bitsandbytes imports.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_nf4 import BLOCKSIZE, IN, OUT, _bnb_dequant_fn, _setup

import spft.ops as ops
from sparse_kernels.nf4 import GEMV_DEFAULTS, gemv_4bit, gemv_kernel_for
from spft.reference import nf4 as R

SWEEP = {  # (BN, BK, num_warps)
    "cc": [(4, 1024, 4), (8, 512, 4), (2, 2048, 4), (8, 1024, 4), (4, 512, 2), (16, 256, 4),
           (4, 2048, 8), (2, 1024, 2), (8, 1024, 8)],
    "mma": [(16, 512, 4), (16, 1024, 4), (32, 512, 4), (16, 256, 4), (32, 256, 4),
            (64, 256, 8)],
}


def _rel_err(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.double() - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    from triton.testing import do_bench

    w, q, idx, dv = _setup(double_quant=True)
    w_s = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, BLOCKSIZE, (OUT, IN),
                               torch.float64, dv.double(), idx)
    w_bf16 = ops.nf4_dequantize(q)
    rp = ops.nf4_row_pointers(idx, OUT, IN)
    kw = dict(absmax2=q.absmax2, code2=q.code2, offset=q.offset)
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if have_bnb:
        import bitsandbytes as bnb
        packed_b, state_b, _ = _bnb_dequant_fn(w)
    print(f"device: {torch.cuda.get_device_name()}; weight read {q.packed.numel() / 1e6:.1f} MB")
    for tokens in (1, 4, 16):
        x = torch.randn(tokens, IN, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(x.double(), w_s)
        t_lin = do_bench(lambda x=x: F.linear(x, w_bf16))
        line = f"T={tokens}: bf16 F.linear {t_lin * 1e3:.1f} us"
        if have_bnb:
            y_b = bnb.matmul_4bit(x, packed_b.t(), state_b)
            err_b = _rel_err(y_b, F.linear(x.double(), w.double()))
            t_bnb = do_bench(lambda x=x: bnb.matmul_4bit(x, packed_b.t(), state_b))
            line += f"; bnb.matmul_4bit {t_bnb * 1e3:.1f} us (rel err vs w {err_b:.1e})"
        print(line, flush=True)
        for kernel in ("cc", "mma"):
            for bn, bk, warps in SWEEP[kernel]:
                cfg = {"BN": bn, "BK": bk, "num_warps": warps}
                try:
                    y = gemv_4bit(x, q.packed, q.absmax, q.code, BLOCKSIZE, OUT, dv=dv, idx=idx,
                                  row_ptr=rp, config=cfg, kernel=kernel, **kw)
                    err = _rel_err(y, expected)
                    if err > 2e-2:
                        print(f"  {kernel} {cfg}: WRONG rel err {err:.2e}")
                        continue
                    t_d = do_bench(lambda c=cfg, x=x, k=kernel: gemv_4bit(
                        x, q.packed, q.absmax, q.code, BLOCKSIZE, OUT, dv=dv, idx=idx,
                        row_ptr=rp, config=c, kernel=k, **kw))
                    t_0 = do_bench(lambda c=cfg, x=x, k=kernel: gemv_4bit(
                        x, q.packed, q.absmax, q.code, BLOCKSIZE, OUT, config=c, kernel=k,
                        **kw))
                    print(f"  {kernel} BN={bn} BK={bk} w={warps}: "
                          f"+1% deltas {t_d * 1e3:.1f} us, no deltas {t_0 * 1e3:.1f} us "
                          f"({q.packed.numel() / t_0 / 1e9:.2f} TB/s), rel err {err:.1e}",
                          flush=True)
                except Exception as exc:  # report and keep sweeping
                    print(f"  {kernel} {cfg}: failed {type(exc).__name__}: {exc}"[:300])
        kernel = gemv_kernel_for(tokens, x.dtype)
        print(f"  default ({kernel}, {GEMV_DEFAULTS[kernel]})")
        y = ops.nf4_linear_small_batch(x, q, dv, idx, row_ptr=rp, check_indices=False)
        assert _rel_err(y, expected) < 2e-2
        t_op = do_bench(lambda x=x: ops.nf4_linear_small_batch(x, q, dv, idx, row_ptr=rp,
                                                               check_indices=False))
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                ops.nf4_linear_small_batch(x, q, dv, idx, row_ptr=rp, check_indices=False)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            y_g = ops.nf4_linear_small_batch(x, q, dv, idx, row_ptr=rp, check_indices=False)
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(y_g, expected) < 2e-2
        t_graph = do_bench(graph.replay)
        print(f"  op eager {t_op * 1e3:.1f} us; op in a CUDA graph {t_graph * 1e3:.1f} us",
              flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    main()
