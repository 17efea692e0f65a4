"""How fast could a small-batch 4-bit GEMV on up_proj (4096 -> 11008) be on this GPU? Times, in
the same CUDA-graph method as `tune_nf4_gemv.py` (distinct buffers in turn, >= 3x L2):

* an empty Triton kernel on the GEMV's grid (688 programs): launch and drain, no work;
* a Triton kernel that only reads the packed weight's bytes (codes + fp32 absmax of the serving
  layout, 25.3 MB) and writes one word per program, over a few block sizes (the best is the
  floor of any kernel that must read those bytes);
* the same read plus the 1% deltas' idx and dv (450k x 8 B).

    python benchmarks/probe_gemv_floor.py
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from tune_nf4_gemv import _graph_us

IN, OUT = 4096, 11008


@triton.jit
def _empty_kernel(out_ptr, n):
    if tl.program_id(0) >= n:  # never true: the launch is all there is
        tl.store(out_ptr, 0)


@triton.jit
def _read_kernel(src_ptr, out_ptr, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """out[pid] = xor of the program's ITERS * BLOCK int32 words of src (a read that cannot be
    dropped and costs almost no instructions)."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src_ptr + offs, mask=offs < n_words, other=0,
                       eviction_policy="evict_first")
    tl.store(out_ptr + pid, tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def _read_us(buffers: list[torch.Tensor], block: int, iters: int, warps: int) -> float:
    n_words = buffers[0].numel()
    programs = triton.cdiv(n_words, block * iters)
    outs = [torch.empty(programs, dtype=torch.int32, device="cuda") for _ in buffers]
    # Check once: the xor over the programs' words is the xor of the whole buffer.
    _read_kernel[(programs,)](buffers[0], outs[0], n_words, BLOCK=block, ITERS=iters,
                              num_warps=warps)
    got = np.bitwise_xor.reduce(outs[0].cpu().numpy())
    assert int(got) == int(np.bitwise_xor.reduce(buffers[0].cpu().numpy()))
    return _graph_us([lambda b=b, o=o: _read_kernel[(programs,)](b, o, n_words, BLOCK=block,
                                                                  ITERS=iters, num_warps=warps)
                      for b, o in zip(buffers, outs)])


def main() -> None:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    weight_bytes = IN * OUT // 2 + IN * OUT // 64 * 4      # codes + fp32 absmax per 64
    delta_bytes = IN * OUT // 100 * 8                        # int32 idx + fp32 dv
    print(f"{torch.cuda.get_device_name()}: weight {weight_bytes / 1e6:.1f} MB, "
          f"deltas {delta_bytes / 1e6:.1f} MB")
    out = torch.empty(1, dtype=torch.int32, device="cuda")
    grid = OUT // 16
    empty = _graph_us([lambda: _empty_kernel[(grid,)](out, grid, num_warps=4)] * 8)
    print(f"  empty kernel, {grid} programs x 4 warps: {empty:5.2f} us")
    sizes = (("weight", weight_bytes), ("weight + deltas", weight_bytes + delta_bytes))
    for label, nbytes in sizes:
        copies = max(4, -(-3 * l2 // nbytes))
        buffers = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32,
                                 device="cuda") for _ in range(copies)]
        best = None
        for block, iters, warps in ((1024, 4, 4), (2048, 4, 8), (4096, 2, 8), (2048, 8, 8),
                                    (1024, 8, 4), (4096, 4, 16)):
            us = _read_us(buffers, block, iters, warps)
            print(f"  read {label} ({nbytes / 1e6:.1f} MB), block {block} x {iters}, "
                  f"{warps} warps: {us:6.2f} us = {nbytes / us / 1e6:4.2f} TB/s")
            best = us if best is None else min(best, us)
        print(f"  best read of {label}: {best:.2f} us")
        del buffers


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    main()
