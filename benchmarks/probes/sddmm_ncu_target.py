"""Runs the staged SDDMM on bench_nf4's shape a few times, for Nsight Compute to profile.

    ncu --clock-control none -k regex:sddmm_staged --launch-skip 2 --launch-count 1 \
        --set full python benchmarks/probes/sddmm_ncu_target.py

(`--clock-control none` leaves the card's clocks as found; the default locks them at base.)
"""
import torch

import spft._C as C

OUT, IN, T, DENSITY = 11008, 4096, 4096, 0.01

g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(T, IN, device="cuda", dtype=torch.bfloat16, generator=g)
dy = torch.randn(T, OUT, device="cuda", dtype=torch.bfloat16, generator=g)
k = int(DENSITY * OUT * IN)
idx = torch.randperm(OUT * IN, device="cuda", generator=g)[:k].sort().values.int()
for _ in range(4):
    C.sddmm_staged(dy, x, idx, IN)
torch.cuda.synchronize()
