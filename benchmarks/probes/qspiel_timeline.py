"""Where the GPU waits inside a qSpIEL step: every kernel of one step with its start, duration
and the idle gap before it (bench_nf4.py's shape; spft's op and the published path).

    PYTHONPATH=$PWD/python:$PWD/benchmarks:$PWD python benchmarks/probes/qspiel_timeline.py

As in `triton.testing.do_bench`, each step follows a 256 MB L2 flush. Steps run eagerly and
replayed from a CUDA graph, under torch.profiler; the last of three steps is printed.
"""

from __future__ import annotations

import torch
from probe_qspiel_step import qspiel_steps
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import capture_graph

FLUSH_BYTES = 256 * 1024 * 1024


def timeline(step, label: str) -> None:
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            flush.zero_()
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    # The last step: everything after the last flush (a fill of FLUSH_BYTES).
    last_flush = max(i for i, e in enumerate(kernels) if e.time_range.elapsed_us() > 20
                     and ("fill" in e.name.lower() or "memset" in e.name.lower()))
    step_kernels = kernels[last_flush + 1:]
    t0 = kernels[last_flush].time_range.end
    prev = t0
    busy = 0.0
    print(f"\n{label}: start µs, duration µs, gap before µs")
    for e in step_kernels:
        gap = e.time_range.start - prev
        dur = e.time_range.elapsed_us()
        busy += dur
        print(f"  {e.time_range.start - t0:8.1f} {dur:8.1f} {gap:7.1f}  {e.name[:70]}")
        prev = max(prev, e.time_range.end)
    print(f"  span {prev - t0:.1f} µs, busy {busy:.1f} µs, idle {prev - t0 - busy:.1f} µs")


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    spft_step, published_step = qspiel_steps()

    for name, step in (("spft qSpIEL", spft_step), ("published", published_step)):
        timeline(step, f"{name}, eager")
        timeline(capture_graph(step).replay, f"{name}, CUDA graph")


if __name__ == "__main__":
    main()
