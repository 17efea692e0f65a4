"""Small-batch 4-bit GEMV on the GPU (LLaMA-2-7B up_proj: 4096 -> 11008, NF4, double quant,
blocksize 64, 1% unmerged deltas) against its anchors, all in one run:

    python benchmarks/tune_nf4_gemv.py [--triton] [--configs [--tiled-only]] [--tokens T ...]

For 1 / 4 / 16 tokens (or --tokens) it checks every output against the float64 reference
first, then prints two times per contender:
* wall: `triton.testing.do_bench` median of one eager call (host launch cost included);
* gpu: one CUDA graph replaying the call on distinct weights in turn (so the 22.5 MB
  weight is not served from the 50 MB L2), timed by do_bench and divided by the calls in it:
  the kernel's own time, without the host.
Contenders: bf16 `F.linear` on the dequantised weight and `bnb.matmul_4bit` (the anchors), the
compiled kernels (`spft._C.nf4_gemv`, `spft._C.nf4_gemv_tiled`) per launch configuration
(--configs) or their defaults, each with and without the deltas (the packed kernel's default
also without its tail split, and with --configs each config with x for the deltas staged in
shared memory and gathered from global memory), the Triton kernel (--triton), and the public op
`spft.ops.nf4_linear_small_batch`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_nf4 import BLOCKSIZE, IN, OUT, _setup

import spft.ops as ops
from spft import _backend
from spft.reference import nf4 as R


def _copies() -> int:
    """Distinct weights cycled through in a graph: at least 3x the L2 (50 MB on the H100, 60 MB
    on the H200) in 22.5 MB NF4 weights, so each call reads its weight from HBM."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(4, -(-3 * l2 // (IN * OUT // 2)))


def _rel_err(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.double() - expected).abs().max() / expected.abs().max()).item()


def _graph_us(calls: list[Callable[[], object]], repeat: int = 2) -> float:
    """GPU µs per call: the calls (each on its own weight copy) captured `repeat` times."""
    from triton.testing import do_bench
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for fn in calls:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    return do_bench(graph.replay) * 1e3 / (repeat * len(calls))


def _row(name: str, wall_ms: float, gpu_us: float, err: float | None, anchors: dict,
         weight_bytes: float = IN * OUT / 2) -> str:
    """One table line; TB/s counts the weight bytes the call must read (4-bit unless given)."""
    line = f"  {name:<34} wall {wall_ms * 1e3:7.1f} us   gpu {gpu_us:7.1f} us"
    line += f"  ({weight_bytes / gpu_us / 1e6:4.2f} TB/s)"
    for label, ref in anchors.items():
        line += f"  {ref / gpu_us:4.2f}x vs {label}"
    if err is not None:
        line += f"  err {err:.1e}"
    return line


def main() -> None:
    from triton.testing import do_bench
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", action="store_true", help="also time the Triton kernel")
    parser.add_argument("--configs", action="store_true", help="sweep the CUDA launch configs")
    parser.add_argument("--tiled-only", action="store_true",
                        help="with --configs: sweep only the serving-layout kernel's configs")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16],
                        help="token counts to time (1 to 16)")
    args = parser.parse_args()

    copies = _copies()
    setups = [_setup(double_quant=True, seed=s) for s in range(copies)]
    w, q, idx, dv = setups[0]
    w_s = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, BLOCKSIZE, (OUT, IN),
                               torch.float64, dv.double(), idx)
    w16 = [ops.nf4_dequantize(s[1]) for s in setups]
    rps = [ops.nf4_row_pointers(s[2], OUT, IN) for s in setups]
    tiled = [ops.nf4_gemv_pack(s[1]) for s in setups]  # the serving layout, once per weight
    have_ext = _backend.extension_has_cuda()
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if have_bnb:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        bnb_w = [bnbf.quantize_4bit(s[0], blocksize=BLOCKSIZE, compress_statistics=True,
                                    quant_type="nf4") for s in setups]
    print(f"device: {torch.cuda.get_device_name()}; extension: {have_ext}; bitsandbytes: "
          f"{have_bnb}; weight read {q.packed.numel() / 1e6:.1f} MB; {len(idx)} deltas")
    ext = _backend.extension() if have_ext else None

    for tokens in args.tokens:
        x = torch.randn(tokens, IN, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(x.double(), w_s)
        print(f"T={tokens}", flush=True)
        anchors: dict[str, float] = {}
        lin = [lambda c=c: F.linear(x, w16[c]) for c in range(copies)]
        t_lin = _graph_us(lin)
        print(_row("bf16 F.linear (dequantised W)", do_bench(lin[0]), t_lin, None, {},
                   weight_bytes=IN * OUT * 2))
        anchors["F.linear"] = t_lin
        if have_bnb:
            mm = [lambda c=c: bnb.matmul_4bit(x, bnb_w[c][0].t(), bnb_w[c][1])
                  for c in range(copies)]
            err_b = _rel_err(mm[0](), F.linear(x.double(), w.double()))
            t_bnb = _graph_us(mm)
            print(_row("bnb.matmul_4bit", do_bench(mm[0]), t_bnb, err_b, {}))
            anchors["bnb"] = t_bnb

        def contender(name: str, fn_of_copy: Callable[[int], Callable[[], torch.Tensor]],
                      anchors=anchors, expected=expected) -> None:
            try:
                fns = [fn_of_copy(c) for c in range(copies)]
                err = _rel_err(fns[0](), expected)
                if err > 2e-2:
                    print(f"  {name:<34} WRONG: rel err {err:.2e}")
                    return
                print(_row(name, do_bench(fns[0]), _graph_us(fns), err, anchors), flush=True)
            except Exception as exc:  # report and go on with the others
                print(f"  {name:<34} failed {type(exc).__name__}: {exc}"[:300], flush=True)

        def cuda_call(c: int, config=(0, 0, 0, 0), dv_on=True, x=x) -> Callable[[], torch.Tensor]:
            qc, idc, dvc = setups[c][1], setups[c][2], setups[c][3]
            if not dv_on:
                dvc = idc = rp = None
            else:
                rp = rps[c]
            return lambda: ext.nf4_gemv(x, qc.packed, qc.absmax, qc.absmax2, qc.code2,
                                        qc.offset, qc.code, dvc, idc, rp, None, BLOCKSIZE,
                                        OUT, *config)

        if ext is not None:
            print(f"  (default CUDA config for {tokens} tokens: "
                  f"{tuple(ext.nf4_gemv_default_config(tokens))})")
            sweep_bnb_layout = args.configs and not args.tiled_only
            configs = ext.nf4_gemv_configs() if sweep_bnb_layout else [(0, 0, 0)]
            no_delta = F.linear(x.double(), ops.nf4_dequantize(q, torch.float64))
            for config in configs:
                name = ("_C.nf4_gemv mt={} ks={} d={}".format(*config) if any(config)
                        else "_C.nf4_gemv default")
                contender(name, lambda c, config=config: cuda_call(c, tuple(config)))
                contender(name + " no deltas",
                          lambda c, config=config: cuda_call(c, tuple(config), dv_on=False),
                          expected=no_delta)
            has_tiled = hasattr(ext, "nf4_gemv_tiled")
            tiled_configs = ext.nf4_gemv_tiled_configs() if has_tiled and args.configs else []

            def tiled_call(c: int, config=(0, 0, 0, 0, 0, 0), dv_on=True, split_parts=-1,
                           stage_x=-1, x=x) -> Callable[[], torch.Tensor]:
                p, idc, dvc, rp = tiled[c], setups[c][2], setups[c][3], rps[c]
                if not dv_on:
                    dvc = idc = rp = None
                return lambda: ext.nf4_gemv_tiled(x, p.codes, p.absmax, p.code, dvc, idc, rp,
                                                  None, OUT, *config, split_parts=split_parts,
                                                  stage_x=stage_x)

            sweep = [(0, 0, 0, 0, 0, 0)] + [tuple(c) for c in tiled_configs] if has_tiled else []
            for config in sweep:
                name = ("_C.nf4_gemv_tiled ks={} u={} d={} t={} df={} tb={}".format(*config)
                        if any(config) else "_C.nf4_gemv_tiled default")
                contender(name, lambda c, config=config: tiled_call(c, config))
                if args.configs:  # the deltas' x staged in shared memory always, and never
                    contender(name + " stage x",
                              lambda c, config=config: tiled_call(c, config, stage_x=1))
                    contender(name + " gather x",
                              lambda c, config=config: tiled_call(c, config, stage_x=0))
                contender(name + " no deltas",
                          lambda c, config=config: tiled_call(c, config, dv_on=False),
                          expected=no_delta)
                if any(config):
                    continue
                # The same launch without the tail split, for its share of the time.
                contender(name + " unsplit", lambda c: tiled_call(c, split_parts=0))
                contender(name + " unsplit no deltas",
                          lambda c: tiled_call(c, dv_on=False, split_parts=0), expected=no_delta)
        if args.triton:
            from sparse_kernels.nf4 import gemv_4bit

            def triton_call(c: int, x=x) -> Callable[[], torch.Tensor]:
                qc, idc, dvc = setups[c][1], setups[c][2], setups[c][3]
                return lambda: gemv_4bit(x, qc.packed, qc.absmax, qc.code, BLOCKSIZE, OUT,
                                         absmax2=qc.absmax2, code2=qc.code2, offset=qc.offset,
                                         dv=dvc, idx=idc, row_ptr=rps[c])
            contender("Triton gemv_4bit (default)", triton_call)

        def op_call(c: int, x=x) -> Callable[[], torch.Tensor]:
            qc, idc, dvc = setups[c][1], setups[c][2], setups[c][3]
            return lambda: ops.nf4_linear_small_batch(x, qc, dvc, idc, row_ptr=rps[c],
                                                      check_indices=False)
        contender("ops.nf4_linear_small_batch", op_call)

        def op_tiled_call(c: int, x=x) -> Callable[[], torch.Tensor]:
            idc, dvc = setups[c][2], setups[c][3]
            return lambda: ops.nf4_linear_small_batch(x, tiled[c], dvc, idc, row_ptr=rps[c],
                                                      check_indices=False)
        contender("ops.nf4_linear_small_batch (packed)", op_tiled_call)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    main()
