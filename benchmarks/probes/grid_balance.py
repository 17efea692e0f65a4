"""Grid balance of the compiled small-batch GEMV: does the up_proj grid (11008 rows = 688 blocks of
16 rows, 5.21 per SM on the H100's 132 SMs) cost time? Times the default 1-token config without
deltas (GPU us per call, CUDA graph over 4 weight copies, output checked against float64 first)
for 10560 / 11008 / 12672 rows = 5.00 / 5.21 / 6.00 blocks per SM:

    PYTHONPATH=$PWD/python:$PWD python benchmarks/probes/grid_balance.py
"""
import torch
from triton.testing import do_bench

import spft.ops as ops
from spft import _backend


def main() -> None:
    ext = _backend.extension()
    K = 4096
    for n in (10560, 11008, 12672):
        ws = [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]
        qs = [ops.nf4_quantize(w, 64, True) for w in ws]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        calls = [lambda q=q: ext.nf4_gemv(x, q.packed, q.absmax, q.absmax2, q.code2, q.offset,
                                          q.code, None, None, None, None, 64, n, 0, 0, 0)
                 for q in qs]
        ref = torch.nn.functional.linear(x.double(), ops.nf4_dequantize(qs[0], torch.float64))
        y = calls[0]()
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, f"{n} rows: rel. err {err:.1e}"
        g = torch.cuda.CUDAGraph()
        for c in calls:
            c()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(2):
                for c in calls:
                    c()
        us = do_bench(g.replay) * 1e3 / 8
        blocks = n // 16
        print(f"rows {n:6d} blocks {blocks:4d} ({blocks / 132:.2f}/SM)  {us:6.2f} us  "
              f"{us / blocks * 1000:6.2f} ns/block  err {err:.1e}")


if __name__ == "__main__":
    main()
