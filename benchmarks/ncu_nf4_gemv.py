"""Driver for Nsight Compute: the default small-batch GEMV on the up_proj shape, at 1 and 16
tokens, without and then with 1% deltas: four launches, one per case, in that order; first on
the bitsandbytes layout (`nf4_gemv`), then on the serving layout (`nf4_gemv_tiled`).

    ncu --kernel-name regex:nf4_gemv --section SpeedOfLight python benchmarks/ncu_nf4_gemv.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_nf4 import IN, OUT, _setup

import spft.ops as ops


def main() -> None:
    _, q, idx, dv = _setup(double_quant=True)
    rp = ops.nf4_row_pointers(idx, OUT, IN)
    xs = {t: torch.randn(t, IN, device="cuda", dtype=torch.bfloat16) for t in (1, 16)}
    for weight in (q, ops.nf4_gemv_pack(q)):
        for with_deltas in (False, True):
            for x in xs.values():
                if with_deltas:
                    ops.nf4_linear_small_batch(x, weight, dv, idx, row_ptr=rp,
                                               check_indices=False)
                else:
                    ops.nf4_linear_small_batch(x, weight)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
