"""S2FT benchmarks (CUDA): s2_linear vs frozen dense / naive slice path / LoRA, saved-activation
bytes, adapter switch vs LoRA merge/unmerge on a 32-layer 7B-shaped stack.

    python benchmarks/bench_s2ft.py                  # table (H100: see benchmarks/RESULTS.md)
    pytest benchmarks/bench_s2ft.py --benchmark-only # pytest-benchmark microbenchmarks

Shapes: down_proj (in 11008 → out 4096) and o_proj (4096 → 4096), 4096 tokens, bf16, 5% of the
input channels trainable (the input axis is what S2FT trains on down/o). Outputs are checked
against the reference before timing; inputs are random (never all-zero).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from spft.ops import s2_linear
from spft.reference import s2 as ref

SHAPES = {"down_proj": (11008, 4096), "o_proj": (4096, 4096)}
TOKENS = 4096
RATIO = 0.05


def _setup(n_in, n_out, axis="input", dtype=torch.bfloat16):
    s = round(RATIO * (n_in if axis == "input" else n_out))
    w = torch.randn(n_out, n_in, device="cuda", dtype=dtype) / n_in ** 0.5
    x = torch.randn(TOKENS, n_in, device="cuda", dtype=dtype)
    dy = torch.randn(TOKENS, n_out, device="cuda", dtype=dtype)
    return s, w, x, dy


def _parts(w, s, axis, adjacent):
    t, f = (w[:s], w[s:]) if axis == "output" else (w[:, :s], w[:, s:])
    if not adjacent:
        t, f = t.clone(), f.clone()
    return t.detach().requires_grad_(), f


def _saved_bytes(fn, weights=()) -> int:
    """Bytes of distinct activation storages autograd saves for backward during fn() (weights
    and adapter parameters, resident anyway, are not counted)."""
    seen = {}
    skip = {w.untyped_storage().data_ptr() for w in weights}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def linear_cases(n_in, n_out, axis="input"):
    """name → (callable doing fwd+bwd, params that must not be all-zero, saved-bytes fn)."""
    s, w, x, dy = _setup(n_in, n_out, axis)
    xg = x.detach().requires_grad_()
    n_train = s * (n_in if axis == "output" else n_out)
    r = max(1, round(n_train / (n_in + n_out)))
    a = (torch.randn(r, n_in, device="cuda", dtype=x.dtype) / n_in ** 0.5).requires_grad_()
    b = (torch.randn(n_out, r, device="cuda", dtype=x.dtype) * 0.01).requires_grad_()
    wfull = w.detach().clone().requires_grad_()
    delta = torch.zeros((s, n_in) if axis == "output" else (n_out, s), device="cuda",
                        dtype=x.dtype).normal_(0, 1e-3).requires_grad_()
    t_adj, f_adj = _parts(w, s, axis, True)
    t_sep, f_sep = _parts(w, s, axis, False)
    weights_only = w.detach()

    def frozen():
        return F.linear(xg, weights_only)

    def s2_adjacent():
        return s2_linear(xg, t_adj, f_adj, axis)

    def s2_split():
        return s2_linear(xg, t_sep, f_sep, axis)

    def naive():
        return ref.s2_linear_naive(xg, weights_only, delta, axis)

    def lora():
        return F.linear(xg, weights_only) + F.linear(F.linear(xg, a), b)

    def full():
        return F.linear(xg, wfull)

    fns = {"frozen dense (dx only)": frozen, "s2_linear (S2Linear layout)": s2_adjacent,
           "s2_linear split cuBLAS": s2_split, "s2_linear split Triton": s2_split,
           "naive full + slice linear": naive, f"LoRA r={r} (same #params)": lora,
           "full fine-tuning (dx + dW)": full}
    return s, r, fns, dy, (xg, t_adj, t_sep, a, b, wfull, delta, f_sep, w)


def check_outputs(n_in, n_out, axis):
    s, w, x, dy = _setup(n_in, n_out, axis)
    x = x[:1000]
    dy = dy[:1000]
    expect_y = ref.s2_linear(x.float(), *(p.float() for p in _parts(w, s, axis, True)), axis)
    for impl in ("cublas", "triton"):
        os.environ["SPFT_S2_SPLIT"] = impl
        for adjacent in (True, False):
            t, f = _parts(w, s, axis, adjacent)
            xg = x.detach().requires_grad_()
            y = s2_linear(xg, t, f, axis)
            y.backward(dy[:, :y.shape[1]])
            err = (y.float() - expect_y).abs().max().item() / expect_y.abs().max().item()
            wr = w.float().requires_grad_()
            xr = x.float().requires_grad_()
            ref.s2_linear_masked(xr, wr, s, axis).backward(dy.float())
            gt = wr.grad[:s] if axis == "output" else wr.grad[:, :s]
            gerr = (t.grad.float() - gt).abs().max().item() / gt.abs().max().item()
            xerr = (xg.grad.float() - xr.grad).abs().max().item() / xr.grad.abs().max().item()
            assert max(err, gerr, xerr) < 2e-2, (impl, adjacent, err, gerr, xerr)
    os.environ["SPFT_S2_SPLIT"] = "cublas"


def time_fwd_bwd(fn, dy, params):
    from triton.testing import do_bench

    def step():
        y = fn()
        y.backward(dy)
        for p in params:
            p.grad = None
    return do_bench(step, warmup=25, rep=100)


def bench_linear(name, n_in, n_out, axis="input"):
    check_outputs(n_in, n_out, axis)
    s, r, fns, dy, params = linear_cases(n_in, n_out, axis)
    rows = {}
    for label, fn in fns.items():
        os.environ["SPFT_S2_SPLIT"] = "triton" if "Triton" in label else "cublas"
        rows[label] = (time_fwd_bwd(fn, dy, params[:7]), _saved_bytes(fn, params[1:]))
    os.environ["SPFT_S2_SPLIT"] = "cublas"
    base = rows["frozen dense (dx only)"][0]
    naive = rows["naive full + slice linear"][0]
    print(f"\n### {name}: in {n_in} → out {n_out}, {TOKENS} tokens, bf16, axis={axis}, "
          f"s={s} ({RATIO:.0%}), LoRA r={r}\n")
    print("| path | fwd+bwd ms | × frozen dense | × naive | saved for backward (MiB) |")
    print("|---|---|---|---|---|")
    for label, (ms, nbytes) in rows.items():
        print(f"| {label} | {ms:.3f} | {ms / base:.3f} | {ms / naive:.3f} | "
              f"{nbytes / 2**20:.1f} |")
    return rows


# --------------------------------------------------------------------------- adapter switching
def bench_switch(n_layers=32):
    from triton.testing import do_bench

    from spft.s2ft import AdapterEntry, S2Adapter, apply_adapter, remove_adapter
    torch.manual_seed(0)
    stack = torch.nn.ModuleDict()
    for i in range(n_layers):
        stack[f"{i}"] = torch.nn.ModuleDict({
            "o_proj": torch.nn.Linear(4096, 4096, bias=False),
            "down_proj": torch.nn.Linear(11008, 4096, bias=False)})
    stack = stack.to("cuda", torch.bfloat16)

    def s2_adapter(seed):
        g = torch.Generator().manual_seed(seed)
        ent = {}
        for i in range(n_layers):
            for mod, n_in in (("o_proj", 4096), ("down_proj", 11008)):
                s = round(RATIO * n_in)
                idx = torch.randperm(n_in, generator=g)[:s].sort().values
                ent[f"{i}.{mod}"] = AdapterEntry("input", idx.cuda(),
                                                 torch.randn(4096, s, device="cuda") * 1e-3)
        return S2Adapter(ent)

    a, b = s2_adapter(1), s2_adapter(2)
    apply_adapter(stack, a)
    state = {"cur": a}

    def s2_switch():
        nxt = b if state["cur"] is a else a
        remove_adapter(stack, state["cur"])
        apply_adapter(stack, nxt)
        state["cur"] = nxt

    s2_ms = do_bench(s2_switch, warmup=5, rep=50)
    remove_adapter(stack, state["cur"])
    n_s2 = sum(e.delta.numel() for e in a.entries.values())

    loras = []
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        lo = {}
        for i in range(n_layers):
            for mod, n_in in (("o_proj", 4096), ("down_proj", 11008)):
                s = round(RATIO * n_in)
                r = round(s * 4096 / (n_in + 4096))
                lo[f"{i}.{mod}"] = (
                    torch.randn(r, n_in, device="cuda", dtype=torch.bfloat16, generator=g),
                    torch.randn(4096, r, device="cuda", dtype=torch.bfloat16, generator=g) * 1e-3)
        loras.append(lo)
    n_lora = sum(x.numel() + y.numel() for x, y in loras[0].values())
    mods = {n: m for n, m in stack.named_modules() if isinstance(m, torch.nn.Linear)}
    cur = {"i": 0}

    @torch.no_grad()
    def lora_switch():
        old, new = loras[cur["i"]], loras[1 - cur["i"]]
        for name, m in mods.items():
            a_, b_ = old[name]
            m.weight.addmm_(b_, a_, alpha=-1.0)   # unmerge (peft-style W -= B A)
            a_, b_ = new[name]
            m.weight.addmm_(b_, a_)               # merge
        cur["i"] = 1 - cur["i"]

    lora_ms = do_bench(lora_switch, warmup=5, rep=50)
    print(f"\n### Adapter switch, {n_layers}-layer 7B-shaped stack (o_proj + down_proj per "
          "layer, bf16)\n")
    print("| adapter | trainable params | switch ms (remove old + apply new) |")
    print("|---|---|---|")
    print(f"| S2FT (5% of input channels, index_copy of fp32-accumulated blocks) | "
          f"{n_s2 / 1e6:.1f} M | {s2_ms:.2f} |")
    print(f"| LoRA same #params (unmerge + merge, addmm_) | {n_lora / 1e6:.1f} M | "
          f"{lora_ms:.2f} |")
    return s2_ms, lora_ms


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, (n_in, n_out) in SHAPES.items():
        bench_linear(name, n_in, n_out, "input")
    bench_linear("down_proj (output axis, for reference)", 11008, 4096, "output")
    bench_switch()


# --------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.mark.gpu
    @pytest.mark.parametrize("path", ["frozen dense (dx only)", "s2_linear (S2Linear layout)",
                                      "naive full + slice linear"])
    def test_bench_down_proj(benchmark, path):
        _, _, fns, dy, _ = linear_cases(11008, 4096)
        fn = fns[path]

        def step():
            fn().backward(dy)
            torch.cuda.synchronize()
        benchmark(step)


if __name__ == "__main__":
    main()
