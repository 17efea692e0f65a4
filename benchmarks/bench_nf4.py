"""NF4 base weights on the LLaMA-2-7B up_proj shape (in 4096 → out 11008, bf16 compute).

    pytest benchmarks/bench_nf4.py --benchmark-only      # microbenchmarks (CUDA)
    python benchmarks/bench_nf4.py                        # the table (checks outputs first)

Rows: dequantise (and dequantise + scatter 1% deltas) against the minimal bytes and HBM
ceiling; qSpIEL forward+backward at 4096 tokens against spft's bf16-base op and the published
path (dequantise, clone, scatter_add, linear); the small-batch kernel at 1/4/16 tokens against
`F.linear` on the dequantised bf16 weight. bitsandbytes rows run when it is importable.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

import spft.ops as ops
from spft.reference import nf4 as R

OUT, IN, TOKENS, DENSITY, BLOCKSIZE = 11008, 4096, 4096, 0.01, 64
STEP_ROUNDS = 5  # interleaved rounds of the fwd+bwd step timings in main()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _setup(double_quant: bool = True, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(OUT, IN, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    q = ops.nf4_quantize(w, BLOCKSIZE, double_quant)
    k = int(DENSITY * w.numel())
    idx = torch.randperm(w.numel(), device="cuda", generator=g)[:k].sort().values.int()
    dv = torch.randn(k, device="cuda", generator=g) * 1e-3
    return w, q, idx, dv


def _published(x, q, dv, idx, dequant):
    """The qSpIEL reference path: dequantise, clone, scatter_add, linear (dense dW in autograd)."""
    w = dequant(q).view(-1).clone()
    w = w.scatter_add(0, idx.long(), dv.to(w.dtype)).view(OUT, IN)
    return F.linear(x, w)


def _bnb_dequant_fn(w):
    import bitsandbytes.functional as bnbf
    packed, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True,
                                       quant_type="nf4")
    return packed, state, (lambda *_: bnbf.dequantize_4bit(packed, state))


# --------------------------------------------------------------------------- pytest-benchmark
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _bench(benchmark, fn):
    fn()
    torch.cuda.synchronize()
    benchmark(lambda: (fn(), torch.cuda.synchronize()))


@cuda
def test_bench_dequantize(benchmark):
    _, q, _, _ = _setup()
    _bench(benchmark, lambda: ops.nf4_dequantize(q))


@cuda
def test_bench_dequantize_scatter(benchmark):
    _, q, idx, dv = _setup()
    _bench(benchmark, lambda: ops.nf4_dequantize_scatter(q, dv, idx, check_indices=False))


@cuda
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_bench_small_batch(benchmark, tokens):
    _, q, idx, dv = _setup()
    rp = ops.nf4_row_pointers(idx, OUT, IN)
    x = torch.randn(tokens, IN, device="cuda", dtype=torch.bfloat16)
    _bench(benchmark, lambda: ops.nf4_linear_small_batch(x, q, dv, idx, row_ptr=rp,
                                                         check_indices=False))


@cuda
def test_bench_qspiel_fwd_bwd(benchmark):
    _, q, idx, dv = _setup()
    x = torch.randn(TOKENS, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dvp = dv.clone().requires_grad_()
    dy = torch.randn(TOKENS, OUT, device="cuda", dtype=torch.bfloat16)
    _bench(benchmark, lambda: ops.sparse_delta_linear_nf4(x, q, dvp, idx,
                                                          check_indices=False).backward(dy))


# --------------------------------------------------------------------------- table
def main() -> None:
    from functools import partial

    from triton.testing import do_bench as triton_do_bench

    # Median of each call's repetitions (do_bench's default is the mean, which a few slow
    # repetitions pull up: the card drops to ~1.7 GHz at its power cap during the steps).
    do_bench = partial(triton_do_bench, return_mode="median")

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; bnb: {HAS_BNB}")
    w, q, idx, dv = _setup(double_quant=True)
    _, q_plain, _, _ = _setup(double_quant=False)
    k = idx.numel()

    # ---- correctness first
    ref = R.dequantize_4bit(q.packed, q.absmax_fp32(), q.code, BLOCKSIZE, w.numel(),
                            torch.bfloat16).view(OUT, IN)
    assert torch.equal(ops.nf4_dequantize(q), ref), "dequantise != reference"
    ref_s = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, BLOCKSIZE, (OUT, IN),
                                 torch.bfloat16, dv, idx)
    assert torch.equal(ops.nf4_dequantize_scatter(q, dv, idx), ref_s), "dequant+scatter != ref"
    mids, order = R.quantize_bounds("nf4", "cuda")
    from sparse_kernels.nf4 import dequantize_4bit, gemv_4bit, quantize_4bit
    p_k, a_k = quantize_4bit(w, BLOCKSIZE, mids, order)
    p_r, a_r = R.quantize_4bit(w, BLOCKSIZE, "nf4")
    assert torch.equal(p_k, p_r) and torch.equal(a_k, a_r), "quantise != reference"
    print("checks: quantise, dequantise, dequantise+scatter bit-exact vs reference")

    rows: list[tuple[str, float, str]] = []

    def add(name, ms, note=""):
        rows.append((name, ms, note))
        print(f"  {name:<58} {ms * 1e3:9.1f} us  {note}", flush=True)

    def tbps(nbytes, ms):
        return nbytes / (ms * 1e-3) / 1e12

    n = w.numel()
    # The ceiling the "% of HBM" notes divide by: a device copy measured in this run (3.0 TB/s
    # on the H100 of ANCHORS.md, about 4.3 on an H200).
    ms_copy = do_bench(lambda: ref.clone())
    hbm_tbps = tbps(n * 4, ms_copy)
    bytes_dq = n // 2 + q.absmax.numel() + q.absmax2.numel() * 4 + n * 2
    bytes_plain = n // 2 + q_plain.absmax.numel() * 4 + n * 2

    # ---- dequantise: kernel-level (launcher) times, then through the op (adds dispatch)
    # Eager times: on a slow host a Triton launch costs about as long as the kernel, so these
    # rows carry host time. benchmarks/tune_nf4_dequant.py sweeps the launch configurations in
    # CUDA graphs (GPU time only).
    ms_k = do_bench(lambda: dequantize_4bit(q.packed, q.absmax, q.code, BLOCKSIZE, n,
                                            torch.bfloat16, absmax2=q.absmax2, code2=q.code2,
                                            offset=q.offset))
    add("kernel: dequantize NF4 (double quant)", ms_k,
        f"{tbps(bytes_dq, ms_k):.2f} TB/s = {tbps(bytes_dq, ms_k) / hbm_tbps:.0%} of HBM")
    ms_kp = do_bench(lambda: dequantize_4bit(q_plain.packed, q_plain.absmax, q_plain.code,
                                             BLOCKSIZE, n, torch.bfloat16))
    add("kernel: dequantize NF4 (fp32 absmax)", ms_kp,
        f"{tbps(bytes_plain, ms_kp):.2f} TB/s = {tbps(bytes_plain, ms_kp) / hbm_tbps:.0%} of HBM")
    bytes_s0 = bytes_dq + k * (4 + 4)
    ms_ks = do_bench(lambda: dequantize_4bit(q.packed, q.absmax, q.code, BLOCKSIZE, n,
                                             torch.bfloat16, absmax2=q.absmax2, code2=q.code2,
                                             offset=q.offset, dv=dv, idx=idx))
    add("kernel: dequantize + scatter 1% (double quant; two launches)", ms_ks,
        f"{tbps(bytes_s0, ms_ks):.2f} TB/s = {tbps(bytes_s0, ms_ks) / hbm_tbps:.0%} of HBM")
    ms_dq = do_bench(lambda: ops.nf4_dequantize(q))
    add("spft dequantize NF4 (double quant)", ms_dq,
        f"{tbps(bytes_dq, ms_dq):.2f} TB/s = {tbps(bytes_dq, ms_dq) / hbm_tbps:.0%} of HBM")
    ms_plain = do_bench(lambda: ops.nf4_dequantize(q_plain))
    add("spft dequantize NF4 (fp32 absmax)", ms_plain,
        f"{tbps(bytes_plain, ms_plain):.2f} TB/s = {tbps(bytes_plain, ms_plain) / hbm_tbps:.0%}")
    ms_dqs = do_bench(lambda: ops.nf4_dequantize_scatter(q, dv, idx, check_indices=False))
    bytes_s = bytes_dq + k * (4 + 4)
    add("spft dequantize + scatter 1% (double quant)", ms_dqs,
        f"{tbps(bytes_s, ms_dqs):.2f} TB/s = {tbps(bytes_s, ms_dqs) / hbm_tbps:.0%} of HBM")
    add("device copy of the bf16 weight (the ceiling)", ms_copy, f"{hbm_tbps:.2f} TB/s")
    bnb_dq = None
    if HAS_BNB:
        try:
            packed_b, state_b, bnb_dq = _bnb_dequant_fn(w)
            ms_b = do_bench(bnb_dq)
            add("bitsandbytes dequantize_4bit (double quant)", ms_b,
                f"spft/bnb = {ms_dq / ms_b:.2f}x; spft+scatter/bnb = {ms_dqs / ms_b:.2f}x")
        except Exception as exc:  # report, keep going
            print(f"  bnb dequantize failed: {exc!r}")
            bnb_dq = None

    # ---- qSpIEL forward + backward at 4096 tokens
    x = torch.randn(TOKENS, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(TOKENS, OUT, device="cuda", dtype=torch.bfloat16)
    dvp = dv.clone().requires_grad_()

    def nf4_step():
        ops.sparse_delta_linear_nf4(x, q, dvp, idx, check_indices=False).backward(dy)

    def bf16_step():
        ops.sparse_delta_linear(x, ref, dvp, idx, check_indices=False).backward(dy)

    deq_for_pub = bnb_dq if bnb_dq is not None else (lambda qq: ops.nf4_dequantize(qq))
    pub_name = "bnb dequant" if bnb_dq is not None else "spft dequant (bnb absent)"

    def published_step():
        _published(x, q, dvp, idx, deq_for_pub).backward(dy)

    # gradient check of the fused op against the published path
    nf4_step()
    gx, gdv = x.grad.clone(), dvp.grad.clone()
    x.grad = dvp.grad = None
    _published(x, q, dvp, idx, lambda qq: ops.nf4_dequantize(qq)).backward(dy)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print(f"    grad check vs published: dx rel {rel(gx, x.grad):.2e}, "
          f"ddv rel {rel(gdv, dvp.grad):.2e}")
    x.grad = dvp.grad = None

    from torch.profiler import ProfilerActivity, profile
    for name, step in (("nf4", nf4_step), ("bf16", bf16_step)):
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"    profile {name} step (CUDA kernels):")
        try:
            print(prof.key_averages().table(sort_by="device_time_total", row_limit=8,
                                            max_name_column_width=60))
        except Exception as exc:  # profiler API differences: report and go on
            print(f"    profiler table failed: {exc!r}")
        x.grad = dvp.grad = None
    # The three steps take turns over STEP_ROUNDS rounds (the card's clocks drift as it heats,
    # so timing one step after the other favours the first); each step's median over the rounds
    # of its per-round medians is reported, and the spread of the per-round ratios to the
    # published path.
    times: dict[str, list[float]] = {"nf4": [], "bf16": [], "pub": []}
    for _ in range(STEP_ROUNDS):
        for name, step in (("nf4", nf4_step), ("bf16", bf16_step), ("pub", published_step)):
            times[name].append(do_bench(step, grad_to_none=[x, dvp]))
    ms_nf4, ms_bf16, ms_pub = (statistics.median(times[k]) for k in ("nf4", "bf16", "pub"))
    ratios = [a / b for a, b in zip(times["nf4"], times["pub"])]
    add("spft bf16-base sparse_delta_linear fwd+bwd, 4096 tok", ms_bf16)
    add("spft qSpIEL (NF4 dq) fwd+bwd, 4096 tok", ms_nf4,
        f"{ms_nf4 / ms_bf16:.3f}x bf16-base; {ms_nf4 / ms_pub:.3f}x published (rounds "
        f"{min(ratios):.3f}-{max(ratios):.3f}x)")
    add(f"published qSpIEL fwd+bwd ({pub_name})", ms_pub)

    # ---- small batch
    rp = ops.nf4_row_pointers(idx, OUT, IN)
    for tokens in (1, 4, 16):
        xs = torch.randn(tokens, IN, device="cuda", dtype=torch.bfloat16)
        y = ops.nf4_linear_small_batch(xs, q, dv, idx, row_ptr=rp, check_indices=False)
        expect = F.linear(xs.double(), ref_s.double())
        err = ((y.double() - expect).abs().max() / expect.abs().max()).item()
        ms_s = do_bench(lambda xs=xs: ops.nf4_linear_small_batch(
            xs, q, dv, idx, row_ptr=rp, check_indices=False))
        ms_s0 = do_bench(lambda xs=xs: ops.nf4_linear_small_batch(xs, q))
        ms_lin = do_bench(lambda xs=xs: F.linear(xs, ref))
        note = (f"{ms_lin / ms_s:.2f}x faster than bf16 F.linear ({ms_lin * 1e3:.1f} us); "
                f"no-delta {ms_s0 * 1e3:.1f} us; "
                f"{tbps(n // 2, ms_s0):.2f} TB/s weight read; max rel err {err:.1e}")
        add(f"spft small-batch NF4 + 1% unmerged deltas, {tokens} tok", ms_s, note)
        if HAS_BNB:
            try:
                import bitsandbytes as bnb
                packed_b, state_b, _ = _bnb_dequant_fn(w)
                ms_b = do_bench(lambda xs=xs: bnb.matmul_4bit(xs, packed_b.t(), state_b))
                add(f"bnb.matmul_4bit, {tokens} tok", ms_b, f"spft is {ms_b / ms_s:.2f}x faster")
            except Exception as exc:
                print(f"  bnb.matmul_4bit failed: {exc!r}")
    # the GEMV kernel alone (launcher, default config; benchmarks/tune_nf4_gemv.py sweeps)
    for tokens in (1, 4, 16):
        xs = torch.randn(tokens, IN, device="cuda", dtype=torch.bfloat16)
        ms_t = do_bench(lambda xs=xs: gemv_4bit(xs, q.packed, q.absmax, q.code, BLOCKSIZE, OUT,
                                                absmax2=q.absmax2, code2=q.code2,
                                                offset=q.offset, dv=dv, idx=idx, row_ptr=rp))
        add(f"kernel: small-batch + 1% deltas, {tokens} tok", ms_t)
    print("\n| what | time (us) | note |\n|---|---|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms * 1e3:.1f} | {note} |")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    main()
