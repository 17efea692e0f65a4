"""Timing and memory helpers shared by the benchmarks (GPU only)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """`fn` captured in a CUDA graph, after `warmup` calls on a side stream; replaying it times
    GPU work only, without the host's launches."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_ms(fn: Callable[[], object], warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of `fn` with CUDA events (triton.testing.do_bench)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def extra_peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory `fn` allocates beyond what is live before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [f"{c:.3f}" if isinstance(c, float) else str(c) for c in row]
        print("| " + " | ".join(cells) + " |")


def print_kernels(step: Callable[[], object], rows: int | None = None) -> float:
    """One profiled call of `step` (torch.profiler): its CUDA kernels by total GPU time, the
    largest first (the first `rows` of them if given), and their sum; returns the sum in µs."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                    key=lambda e: -e.device_time_total)
    for event in events[:rows]:
        print(f"      {event.device_time_total:8.1f} us  x{event.count:<3} {event.key[:90]}")
    total = sum(e.device_time_total for e in events)
    print(f"      {total:8.1f} us  sum of kernel times")
    return total
