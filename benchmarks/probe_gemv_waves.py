"""Is the packed GEMV limited by how its row tiles fall on the SMs? Times the default
`spft._C.nf4_gemv_tiled` (1 token, no deltas, in 4096) at out sizes that give 4, 5 and 6 tiles
per SM exactly and at 11008 (5.2), with the tail split (automatic) and without: per-tile time
equal across them means the SMs are evenly loaded; 11008 costing as much as 6 tiles per SM means
the last partial wave is paid in full. 4096 and 14336 (LLaMA-3-8B's FFN) are there for range.

    python benchmarks/probe_gemv_waves.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tune_nf4_gemv import _graph_us

import spft.ops as ops
from spft import _backend

IN = 4096


def main() -> None:
    ext = _backend.extension()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}: {sms} SMs")
    for tokens in (1, 16):
        x = torch.randn(tokens, IN, device="cuda", dtype=torch.bfloat16)
        for out in (4096, sms * 16 * 4, sms * 16 * 5, 11008, sms * 16 * 6, 14336):
            copies = max(4, -(-3 * l2 // (IN * out // 2)))
            packed = []
            for _ in range(copies):
                w = torch.randn(out, IN, device="cuda", dtype=torch.bfloat16) * 0.02
                packed.append(ops.nf4_gemv_pack(ops.nf4_quantize(w, 64, True)))
            y = ext.nf4_gemv_tiled(x, packed[0].codes, packed[0].absmax, packed[0].code, None,
                                   None, None, None, out, 0, 0, 0, 0)
            ref = x.double() @ packed[0].dequantize(torch.float64).t()
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, err
            for split in (-1, 0):
                us = _graph_us([lambda p=p, split=split: ext.nf4_gemv_tiled(
                    x, p.codes, p.absmax, p.code, None, None, None, None, out, 0, 0, 0, 0,
                    split_parts=split) for p in packed])
                tiles = out / 16
                print(f"  T={tokens:2d} out {out:6d} split {'auto' if split else 'none'}: "
                      f"{tiles / sms:4.2f} tiles/SM  {us:6.1f} us  "
                      f"{us / (tiles / sms):5.2f} us per tile/SM  "
                      f"{IN * out / 2 / us / 1e6:4.2f} TB/s  err {err:.1e}")
            del packed


if __name__ == "__main__":
    main()
