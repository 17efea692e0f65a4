"""4-bit NF4/FP4 base weights: reference vs bitsandbytes bytes, Triton kernels vs reference
(exact for quantise/dequantise, bf16 tolerance for linears), ops, modules and bad input."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_unique_indices

import spft.ops as ops
from spft.nn import NF4Linear, SparseDeltaLinear, quantize_model_nf4
from spft.ops.nf4 import NF4Weight
from spft.reference import nf4 as R

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")

SHAPES = [  # (out, in, blocksize): odd numel, numel not a multiple of blocksize, tiny, wide
    pytest.param(37, 70, 64, id="37x70-b64"),
    pytest.param(5, 33, 32, id="5x33-b32-odd"),
    pytest.param(3, 129, 128, id="3x129-b128"),
    pytest.param(2, 4101, 4096, id="2x4101-b4096"),
    pytest.param(16, 256, 256, id="16x256-b256"),
]


def _weight(out_f, in_f, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- bnb bytes
@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_f,in_f,blocksize", SHAPES)
def test_reference_bytes_equal_bitsandbytes(out_f, in_f, blocksize, dtype, quant_type):
    import bitsandbytes.functional as bnbf
    w = _weight(out_f, in_f, dtype)
    w[0, :3] = 0.0
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    q = ops.nf4_quantize(w, blocksize, quant_type=quant_type)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.code, state.code.float())
    assert torch.equal(ops.nf4_dequantize(q), bnbf.dequantize_4bit(packed, state))


@needs_bnb
@pytest.mark.parametrize("out_f,in_f,blocksize", SHAPES)
def test_double_quant_matches_bitsandbytes(out_f, in_f, blocksize):
    import bitsandbytes.functional as bnbf
    w = _weight(out_f, in_f, torch.bfloat16, seed=1)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True,
                                       quant_type="nf4")
    q = ops.nf4_quantize(w, blocksize, double_quant=True)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.offset, state.offset)
    assert torch.equal(q.absmax2, state.state2.absmax)
    assert torch.equal(q.code2, state.state2.code)
    # bnb's CPU 8-bit quantiser uses an approximate bucket search (BinSearch Direct2) that
    # sometimes picks the second-nearest code; ours picks the nearest. Differences are at most
    # one code apart and never farther from the value than bnb's choice.
    mine, theirs = q.absmax.long(), state.absmax.long()
    assert (mine - theirs).abs().max().item() <= 1
    assert (mine != theirs).float().mean().item() <= 0.02
    # Importing bnb's tensors gives bnb's dequantisation exactly.
    imported = NF4Weight.from_bnb(packed, state)
    assert torch.equal(ops.nf4_dequantize(imported), bnbf.dequantize_4bit(packed, state))


@needs_bnb
def test_params4bit_routes_through_sparse_delta_linear():
    import bitsandbytes as bnb
    w = _weight(24, 64, torch.bfloat16, seed=2)
    lin = bnb.nn.Linear4bit(64, 24, bias=False, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    lin = lin.to("cpu")
    idx = random_unique_indices(w.numel(), 50)
    dv = torch.randn(50) * 0.01
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = ops.sparse_delta_linear(x, lin.weight, dv, idx)
    w_ref = R.dequantize_scatter(lin.weight.data, NF4Weight.from_bnb(lin.weight).absmax_fp32(),
                                 R.code_table("nf4"), 64, (24, 64), torch.bfloat16, dv, idx)
    assert_close(y, F.linear(x.double(), w_ref.double()), torch.bfloat16)
    module = SparseDeltaLinear(lin, num_deltas=40)
    module.dv.data.normal_(0, 0.01)
    module(x).float().sum().backward()
    assert module.dv.grad is not None and module.dv.grad.shape == (40,)


def test_dynamic_map_sorted_and_signed():
    code2 = R.dynamic_map()
    assert code2.shape == (256,) and bool((code2[1:] >= code2[:-1]).all())
    assert code2[-1].item() == 1.0 and code2.min().item() < -0.99


# --------------------------------------------------------------------------- Triton kernels
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_f,in_f,blocksize", SHAPES)
def test_quantize_kernel_exact(triton_backend, device, out_f, in_f, blocksize, dtype,
                               quant_type):
    from sparse_kernels.nf4 import quantize_4bit
    w = _weight(out_f, in_f, dtype, seed=3, device=device)
    w.view(-1)[:blocksize] = 0.0  # an all-zero block
    mids, order = R.quantize_bounds(quant_type, device)
    packed, absmax = quantize_4bit(w, blocksize, mids, order)
    ref_packed, ref_absmax = R.quantize_4bit(w, blocksize, quant_type)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_f,in_f,blocksize", SHAPES)
def test_dequantize_kernel_exact(triton_backend, device, out_f, in_f, blocksize, dtype,
                                 double_quant):
    w = _weight(out_f, in_f, dtype, seed=4, device=device)
    q = ops.nf4_quantize(w, blocksize, double_quant)
    ref = R.dequantize_4bit(q.packed, q.absmax_fp32(), q.code, blocksize, w.numel(), dtype)
    assert torch.equal(ops.nf4_dequantize(q).view(-1), ref)


@pytest.mark.parametrize("pair_store", [False, True], ids=["elements", "pairs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f,in_f,blocksize", SHAPES[:4])
def test_dequantize_both_store_kernels_exact(triton_backend, device, out_f, in_f, blocksize,
                                             dtype, pair_store):
    """Both dequantise kernels, several programs each (small elems_per_program), odd numel
    (the pair kernel's lone last element) and a misaligned `out` (pairs decline it)."""
    from sparse_kernels.nf4 import dequantize_4bit
    w = _weight(out_f, in_f, dtype, seed=9, device=device)
    q = ops.nf4_quantize(w, blocksize, True)
    n = w.numel()
    ref = R.dequantize_4bit(q.packed, q.absmax_fp32(), q.code, blocksize, n, dtype)
    kw = dict(absmax2=q.absmax2, code2=q.code2, offset=q.offset, pair_store=pair_store)
    for elems in (blocksize, 4 * blocksize):
        buf = torch.full((n + 2,), float("nan"), dtype=dtype, device=device)
        out = dequantize_4bit(q.packed, q.absmax, q.code, blocksize, n, dtype, out=buf[:n],
                              elems_per_program=elems, **kw)
        assert torch.equal(out, ref)
        assert buf[n:].isnan().all(), "wrote past out"
    shifted = torch.full((n + 1,), float("nan"), dtype=dtype, device=device)[1:]
    if pair_store:
        with pytest.raises(ValueError, match="pair_store"):
            dequantize_4bit(q.packed, q.absmax, q.code, blocksize, n, dtype, out=shifted, **kw)
    else:
        kw.pop("pair_store")  # the default declines pairs on a misaligned out
        assert torch.equal(dequantize_4bit(q.packed, q.absmax, q.code, blocksize, n, dtype,
                                           out=shifted, **kw), ref)


@pytest.mark.parametrize("deltas", ["fused", "scatter-pass", "unsorted"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
@pytest.mark.parametrize("k_frac", [0.0, 0.05, 1.0], ids=["k0", "k5pct", "full"])
@pytest.mark.parametrize("out_f,in_f,blocksize", SHAPES[:3])
def test_dequantize_scatter_exact(triton_backend, device, out_f, in_f, blocksize, k_frac,
                                  double_quant, index_dtype, deltas):
    """Deltas added by each dequantise program (sorted idx; several delta steps per program at
    full density) or by a second scatter launch (any order)."""
    from sparse_kernels.nf4 import dequantize_4bit
    w = _weight(out_f, in_f, torch.bfloat16, seed=5, device=device)
    q = ops.nf4_quantize(w, blocksize, double_quant)
    k = round(k_frac * w.numel())
    idx = random_unique_indices(w.numel(), k, index_dtype, device, sort=deltas != "unsorted")
    dv = torch.randn(k, device=device) * 0.01
    out = torch.full((w.numel(),), float("nan"), dtype=torch.bfloat16, device=device)
    dequantize_4bit(q.packed, q.absmax, q.code, blocksize, w.numel(), torch.bfloat16,
                    absmax2=q.absmax2, code2=q.code2, offset=q.offset, dv=dv, idx=idx,
                    elems_per_program=256, out=out, idx_sorted=deltas == "fused")
    ref = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, blocksize, (out_f, in_f),
                               torch.bfloat16, dv, idx)
    assert torch.equal(out.view(out_f, in_f), ref)
    assert torch.equal(ops.nf4_dequantize_scatter(q, dv, idx), ref)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("out_f,in_f,blocksize", [
    pytest.param(40, 128, 64, id="40x128-b64"),
    pytest.param(17, 64, 32, id="17x64-b32"),
    pytest.param(24, 256, 256, id="24x256-b256"),
])
def test_small_batch_kernel(triton_backend, device, out_f, in_f, blocksize, tokens,
                            double_quant):
    w = _weight(out_f, in_f, torch.bfloat16, seed=6, device=device)
    q = ops.nf4_quantize(w, blocksize, double_quant)
    k = w.numel() // 20
    idx = random_unique_indices(w.numel(), k, torch.int32, device)
    dv = torch.randn(k, device=device) * 0.02
    bias = torch.randn(out_f, dtype=torch.bfloat16, device=device)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16, device=device)
    w_ref = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, blocksize, (out_f, in_f),
                                 torch.float64, dv.double(), idx)
    expected = F.linear(x.double(), w_ref, bias.double())
    y = ops.nf4_linear_small_batch(x, q, dv, idx, bias)
    assert y.shape == (tokens, out_f)
    assert_close(y, expected, torch.bfloat16)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    assert_close(ops.nf4_linear_small_batch(x, q, dv, idx, bias, row_ptr=rp), expected,
                 torch.bfloat16)
    no_delta = F.linear(x.double(), ops.nf4_dequantize(q, torch.float64), bias.double())
    assert_close(ops.nf4_linear_small_batch(x, q, bias=bias), no_delta, torch.bfloat16)


@pytest.mark.parametrize("kernel,tokens", [("cc", 1), ("cc", 4), ("cc", 7), ("cc", 16),
                                           ("mma", 5), ("mma", 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_gemv_kernels_each_path(triton_backend, device, kernel, tokens, dtype, idx_dtype):
    """Both GEMV kernels, every x dtype, token groups that do not divide T, x rows that do not
    start on a 4-byte boundary (read through a clone)."""
    if kernel == "mma" and dtype == torch.float32:
        pytest.skip("the tensor-core path takes 16-bit x only")
    from sparse_kernels.nf4 import gemv_4bit
    out_f, in_f, blocksize = 45, 192, 64
    w = _weight(out_f, in_f, dtype, seed=11, device=device)
    q = ops.nf4_quantize(w, blocksize, double_quant=True)
    k = w.numel() // 10
    idx = random_unique_indices(w.numel(), k, idx_dtype, device)
    dv = torch.randn(k, device=device) * 0.02
    x_store = torch.randn(tokens * in_f + 1, dtype=dtype, device=device)
    x = x_store[1:].view(tokens, in_f)  # odd storage offset
    w_ref = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, blocksize, (out_f, in_f),
                                 torch.float64, dv.double(), idx)
    expected = F.linear(x.double(), w_ref)
    y = gemv_4bit(x, q.packed, q.absmax, q.code, blocksize, out_f, absmax2=q.absmax2,
                  code2=q.code2, offset=q.offset, dv=dv, idx=idx, kernel=kernel)
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("kernel,config", [
    ("cc", {"BN": 4, "BK": 64, "num_warps": 4}),     # several K steps, one group each
    ("cc", {"BN": 8, "BK": 1024, "num_warps": 4}),   # one K step, masked groups
    ("mma", {"BN": 16, "BK": 128, "num_warps": 4}),
])
@pytest.mark.parametrize("blocksize", [32, 256])
def test_gemv_launch_configs(triton_backend, device, kernel, config, blocksize):
    from sparse_kernels.nf4 import gemv_4bit
    out_f, in_f, tokens = 21, 3 * 256, 6
    w = _weight(out_f, in_f, torch.bfloat16, seed=12, device=device)
    q = ops.nf4_quantize(w, blocksize, double_quant=False)
    k = w.numel() // 7
    idx = random_unique_indices(w.numel(), k, torch.int64, device)
    dv = torch.randn(k, device=device) * 0.02
    bias = torch.randn(out_f, dtype=torch.bfloat16, device=device)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16, device=device)
    w_ref = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, blocksize, (out_f, in_f),
                                 torch.float64, dv.double(), idx)
    y = gemv_4bit(x, q.packed, q.absmax, q.code, blocksize, out_f, dv=dv, idx=idx, bias=bias,
                  config=config, kernel=kernel)
    assert_close(y, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)


# --------------------------------------------------------------------------- the linear op
@pytest.mark.parametrize("tokens", [2, 37])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
def test_sparse_delta_linear_nf4_grads(triton_backend, device, tokens, double_quant):
    out_f, in_f, blocksize = 24, 128, 64
    w = _weight(out_f, in_f, torch.bfloat16, seed=7, device=device)
    q = ops.nf4_quantize(w, blocksize, double_quant)
    k = 100
    idx = random_unique_indices(w.numel(), k, torch.int64, device, sort=False)
    dv = (torch.randn(k, device=device) * 0.01).requires_grad_()
    bias = torch.randn(out_f, dtype=torch.bfloat16, device=device).requires_grad_()
    x = torch.randn(2, tokens, in_f, dtype=torch.bfloat16, device=device).requires_grad_()
    y = ops.sparse_delta_linear_nf4(x, q, dv, idx, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, dv64 = x.detach().double().requires_grad_(), dv.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    base = ops.nf4_dequantize(q, torch.float64).view(-1)
    w64 = base.index_add(0, idx.long(), dv64).view(out_f, in_f)
    y64 = F.linear(x64, w64, b64)
    y64.backward(dy.double())
    assert_close(y, y64, torch.bfloat16)
    assert_close(x.grad, x64.grad, torch.bfloat16)
    assert_close(dv.grad, dv64.grad, torch.bfloat16)
    assert_close(bias.grad, b64.grad, torch.bfloat16)


def test_nf4_eager_path_equals_registered_op():
    w = _weight(12, 64, torch.float32, seed=13)
    q = ops.nf4_quantize(w, 32, double_quant=True)
    idx = random_unique_indices(w.numel(), 40, torch.int64, "cpu")
    dv0 = torch.randn(40) * 0.01
    x0 = torch.randn(3, 64)
    bias0 = torch.randn(12)
    results = []
    for fn in (lambda x, dv, b: ops.sparse_delta_linear_nf4(x, q, dv, idx, b),
               lambda x, dv, b: torch.ops.spft.sparse_delta_linear_nf4(
                   x, *q.tensors(), dv, idx, b, q.blocksize, 12, 64)):
        x, dv, b = (t.clone().requires_grad_() for t in (x0, dv0, bias0))
        y = fn(x, dv, b)
        y.square().sum().backward()
        results.append((y, x.grad, dv.grad, b.grad))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_opcheck_cpu():
    w = _weight(12, 64, torch.float32, seed=8)
    q = ops.nf4_quantize(w, 32, double_quant=True)
    idx = random_unique_indices(w.numel(), 20)
    dv = torch.randn(20, requires_grad=True)
    x = torch.randn(5, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.spft.nf4_quantize, (w, 32, "nf4"))
    torch.library.opcheck(torch.ops.spft.nf4_dequantize,
                          (*q.tensors(), 32, w.numel(), torch.bfloat16))
    torch.library.opcheck(torch.ops.spft.nf4_dequantize_scatter,
                          (*q.tensors(), dv.detach(), idx, 32, 12, 64, torch.float32))
    torch.library.opcheck(torch.ops.spft.sparse_delta_linear_nf4,
                          (x, *q.tensors(), dv, idx, None, 32, 12, 64))
    torch.library.opcheck(torch.ops.spft.nf4_linear_small_batch,
                          (x.detach(), *q.tensors(), dv.detach(), idx, None, None, 32, 12, 64))


# --------------------------------------------------------------------------- modules
def test_nf4_linear_and_quantize_model():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(64, 32, dtype=torch.bfloat16))
    model.add_module("other", torch.nn.Linear(32, 8, dtype=torch.bfloat16))
    reference = model.q_proj.weight.detach().clone()
    replaced = quantize_model_nf4(model, ["q_proj"], blocksize=32, double_quant=True)
    assert list(replaced) == ["q_proj"] and isinstance(model.q_proj, NF4Linear)
    assert type(model.other) is torch.nn.Linear
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = ops.nf4_dequantize(model.q_proj.weight)
    assert_close(model.q_proj(x), F.linear(x.double(), w.double(),
                                           model.q_proj.bias.double()), torch.bfloat16)
    assert (w.float() - reference.float()).abs().max() < 0.2 * reference.abs().max()
    state = model.q_proj.state_dict()
    assert {"packed", "absmax", "absmax2", "code2", "offset", "code"} <= set(state)


def test_sparse_delta_linear_on_nf4_merge_roundtrip():
    lin = torch.nn.Linear(64, 24, dtype=torch.bfloat16)
    base = NF4Linear.from_linear(lin, blocksize=64)
    original_packed = base.packed.clone()
    module = SparseDeltaLinear(base, num_deltas=80)
    module.dv.data.normal_(0, 0.05)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    y = module(x)
    merged16 = module.merged_weight(torch.bfloat16)
    assert_close(y, F.linear(x.double(), merged16.double(), lin.bias.double()), torch.bfloat16)
    error = module.merge()
    assert module.merged and set(error) == {"max_abs", "rms", "rel_fro"}
    assert 0 < error["rel_fro"] < 0.2
    requantised = ops.nf4_dequantize(base.weight)
    assert_close(module(x), F.linear(x.double(), requantised.double(), lin.bias.double()),
                 torch.bfloat16)
    assert torch.equal(module.merged_weight(torch.bfloat16), merged16)
    module.unmerge()
    assert not module.merged and torch.equal(base.packed, original_packed)
    assert torch.equal(module(x), y)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs():
    w = _weight(8, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="blocksize"):
        ops.nf4_quantize(w, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        ops.nf4_quantize(w, quant_type="int4")
    with pytest.raises(TypeError, match="w must have dtype"):
        ops.nf4_quantize(w.double())
    q = ops.nf4_quantize(w, 64)
    with pytest.raises(ValueError, match="absmax must have shape"):
        NF4Weight(q.packed, q.absmax[:-1], q.shape, q.dtype, 64)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Weight(q.packed, q.absmax, q.shape, q.dtype, 100)
    strided = torch.zeros(q.packed.numel() * 2, dtype=torch.uint8)[::2]
    with pytest.raises(ValueError, match="packed must be contiguous"):
        NF4Weight(strided, q.absmax, q.shape, q.dtype, 64)
    with pytest.raises(ValueError, match="packed has"):
        NF4Weight(q.packed[:-1], q.absmax, q.shape, q.dtype, 64)
    with pytest.raises(ValueError, match="needs absmax2"):
        NF4Weight(q.packed, q.absmax.to(torch.uint8), q.shape, q.dtype, 64)
    idx = torch.tensor([1, 5])
    dv = torch.zeros(2)
    with pytest.raises(ValueError, match="in_features"):
        ops.sparse_delta_linear_nf4(torch.randn(2, 32, dtype=torch.bfloat16), q, dv, idx)
    with pytest.raises(ValueError, match="outside"):
        ops.sparse_delta_linear_nf4(torch.randn(2, 64, dtype=torch.bfloat16), q, dv,
                                    torch.tensor([1, 10_000]))
    with pytest.raises(ValueError, match="merged=True"):
        ops.sparse_delta_linear(torch.randn(2, 64, dtype=torch.bfloat16), q, dv, idx,
                                merged=True)
    with pytest.raises(TypeError, match="NF4Weight"):
        ops.nf4_dequantize(w)


# --------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_gpu_large_int64_shapes_and_compile():
    w = _weight(300, 4096, torch.bfloat16, device="cuda")
    q = ops.nf4_quantize(w, 64, double_quant=True)
    ref = R.dequantize_4bit(q.packed, q.absmax_fp32(), q.code, 64, w.numel(), torch.bfloat16)
    assert torch.equal(ops.nf4_dequantize(q).view(-1), ref)
    idx = random_unique_indices(w.numel(), 5000, torch.int64, "cuda")
    dv = (torch.randn(5000, device="cuda") * 0.01).requires_grad_()
    x = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")

    def f(x, dv):
        return ops.sparse_delta_linear_nf4(x, q, dv, idx, check_indices=False)

    y = torch.compile(f, fullgraph=True)(x, dv)
    assert_close(y, f(x, dv).double(), torch.bfloat16)


def test_compiled_gemv_declines_what_32_bit_offsets_cannot_index():
    """The compiled GEMV indexes the weight and x with 32-bit offsets: a weight of 2^31 or more
    elements (or an x spanning that many) is sent to the other paths, with the reason named."""
    from spft.ops.nf4 import _cuda_gemv_reasons
    x = torch.empty(2, 4096, dtype=torch.bfloat16, device="meta")
    assert _cuda_gemv_reasons(x, torch.empty(2**30 - 16, dtype=torch.uint8, device="meta"),
                              4096) == []
    reasons = _cuda_gemv_reasons(x, torch.empty(2**30, dtype=torch.uint8, device="meta"), 4096)
    assert reasons and "2^31" in reasons[0]
    wide = torch.empty(2, 2**31, dtype=torch.bfloat16, device="meta")[:, :4096]
    assert any("x spans" in r for r in _cuda_gemv_reasons(wide, torch.empty(
        64, dtype=torch.uint8, device="meta"), 4096))


@pytest.mark.parametrize("method", ["gaps", "searchsorted"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["uniform", "clustered", "one", "ends"])
def test_program_starts_both_methods(triton_backend, device, layout, index_dtype, method):
    """The fused dequantise's per-program delta ranges, against a count: long runs of empty
    programs (clustered, a single delta) and deltas in the first and last elements."""
    from sparse_kernels.nf4 import program_starts
    numel, elems = 5000, 96
    n_programs = -(-numel // elems)
    if layout == "uniform":
        idx = random_unique_indices(numel, 700, index_dtype, device)
    elif layout == "clustered":
        idx = torch.arange(2000, 2300, dtype=index_dtype, device=device)
    elif layout == "one":
        idx = torch.tensor([4321], dtype=index_dtype, device=device)
    else:
        idx = torch.tensor([0, 1, 95, 96, 4998, 4999], dtype=index_dtype, device=device)
    starts = program_starts(idx, elems, n_programs, method=method)
    bounds = torch.arange(n_programs + 1, device=device) * elems
    expected = (idx.long()[None, :] < bounds[:, None]).sum(1)
    assert torch.equal(starts.long(), expected)


@pytest.mark.parametrize("method", ["gaps", "searchsorted"])
def test_program_starts_stay_in_range_for_unsorted_idx(triton_backend, device, method):
    """A contract violation (unsorted idx handed over as sorted) may lose deltas but must not
    send a program outside idx: every start lies in [0, k]."""
    from sparse_kernels.nf4 import program_starts
    idx = random_unique_indices(5000, 700, torch.int32, device, sort=False)
    starts = program_starts(idx, 96, -(-5000 // 96), method=method)
    assert int(starts.min()) >= 0 and int(starts.max()) <= idx.numel()


def test_fused_program_starts_reused(triton_backend, device):
    """The delta ranges a materialisation found, handed back as `starts`, give the same bits;
    ranges of another launch are refused by name."""
    from sparse_kernels.nf4 import dequantize_4bit, fused_program_starts
    w = _weight(96, 160, torch.bfloat16, device=device)
    q = ops.nf4_quantize(w, 64, double_quant=True)
    idx = random_unique_indices(w.numel(), 900, torch.int64, device)
    dv = torch.randn(900, device=device) * 0.1
    args = (q.packed, q.absmax, q.code, 64, w.numel(), torch.bfloat16)
    kwargs = dict(absmax2=q.absmax2, code2=q.code2, offset=q.offset, dv=dv, idx=idx,
                  idx_sorted=True)
    starts = fused_program_starts(idx, w.numel(), 64)
    plain = dequantize_4bit(*args, **kwargs)
    assert torch.equal(dequantize_4bit(*args, **kwargs, starts=starts), plain)
    expected = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, 64, tuple(w.shape),
                                    torch.bfloat16, dv, idx)
    assert torch.equal(plain.view(w.shape), expected)
    with pytest.raises(ValueError, match="starts must be"):
        dequantize_4bit(*args, **kwargs, starts=starts[:-1])
    with pytest.raises(ValueError, match="starts must be"):
        dequantize_4bit(*args, **kwargs, starts=starts.int())


def test_qspiel_backward_reuses_the_forward_ranges(triton_backend, device, monkeypatch):
    """The eager qSpIEL op's backward materialises with the forward's delta ranges (searched
    once per step): its gradients equal the registered op's (which searches them again)."""
    import sparse_kernels.nf4 as kernels
    searches = []
    search = kernels.fused_program_starts
    monkeypatch.setattr(kernels, "fused_program_starts",
                        lambda *a, **k: searches.append(1) or search(*a, **k))
    w = _weight(96, 128, torch.bfloat16, device=device)
    q = ops.nf4_quantize(w, 64)
    idx = random_unique_indices(w.numel(), 500, torch.int32, device)
    dv = (torch.randn(500, device=device) * 0.1).requires_grad_()
    x = torch.randn(5, 128, dtype=torch.bfloat16, device=device, requires_grad=True)
    dy = torch.randn(5, 96, dtype=torch.bfloat16, device=device)
    eager = torch.autograd.grad(ops.sparse_delta_linear_nf4(x, q, dv, idx), (x, dv), dy)
    assert len(searches) == 1
    args = (x, *q.tensors(), dv, idx, None, 64, 96, 128)
    registered = torch.autograd.grad(torch.ops.spft.sparse_delta_linear_nf4(*args), (x, dv), dy)
    for a, b in zip(eager, registered, strict=True):
        assert torch.equal(a, b)
