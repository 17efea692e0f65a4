"""The GEMV serving layout of a 4-bit weight (`nf4_gemv_pack` / `NF4GemvWeight`) on the CPU:
the packed bytes against a loop transcription of the layout rule, the inverse, dequantisation
against `nf4_dequantize`, `nf4_linear_small_batch` on it against the `NF4Weight` path and a
float64 reference, the glue to the compiled kernel (with a stand-in extension) and bad input."""

from __future__ import annotations

import itertools
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_unique_indices

import spft.ops as ops
from spft import _backend
from spft.ops import nf4_gemv
from spft.reference import nf4 as R

LAYOUT_SHAPES = [  # (out, in, blocksize): a partial row tile, one tile, blocks over rows, wide
    pytest.param(45, 192, 64, id="45x192-b64"),
    pytest.param(16, 64, 64, id="16x64-b64"),
    pytest.param(33, 256, 128, id="33x256-b128"),
    pytest.param(7, 4096, 4096, id="7x4096-b4096"),
]
LINEAR_SHAPES = [pytest.param(45, 192, 64, id="45x192-b64"),
                 pytest.param(33, 256, 128, id="33x256-b128")]


def _weight(out_f, in_f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype)


# --------------------------------------------------------------------------- slow references
def _slow_codes(q) -> list[list[int]]:
    """codes[n][k] read from q.packed one element at a time (bnb: even e in the high nibble)."""
    n_rows, k_cols = q.shape
    packed = q.packed.tolist()
    rows = []
    for n in range(n_rows):
        row = []
        for k in range(k_cols):
            e = n * k_cols + k
            byte = packed[e // 2]
            row.append(byte >> 4 if e % 2 == 0 else byte & 0xF)
        rows.append(row)
    return rows


def _slow_group_absmax(q) -> list[list[float]]:
    n_rows, k_cols = q.shape
    absmax = q.absmax_fp32().tolist()
    return [[absmax[(n * k_cols + grp * 64) // q.blocksize] for grp in range(k_cols // 64)]
            for n in range(n_rows)]


def _slow_pack(codes: list[list[int]], absmax: list[list[float]], k_cols: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout rule transcribed word by word and nibble by nibble."""
    n_rows = len(codes)
    tiles, groups = -(-n_rows // 16), k_cols // 64
    out = bytearray()
    for tile, grp, g, t, s in itertools.product(range(tiles), range(groups), range(8),
                                                range(4), range(4)):
        word = 0
        for h, j in itertools.product(range(2), range(4)):
            row, col = tile * 16 + g + 8 * h, grp * 64 + 16 * t + 4 * s + j
            value = codes[row][col] if row < n_rows else 0
            word |= value << (4 * (4 * (j // 2) + 2 * h + j % 2))
        out += word.to_bytes(4, "little")
    packed = torch.frombuffer(out, dtype=torch.uint8).clone().view(tiles, groups, 32, 16)
    scales = torch.zeros(tiles, groups, 8, 2)
    for tile, grp, g, h in itertools.product(range(tiles), range(groups), range(8), range(2)):
        row = tile * 16 + g + 8 * h
        if row < n_rows:
            scales[tile, grp, g, h] = absmax[row][grp]
    return packed, scales


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("out_f,in_f,blocksize", LAYOUT_SHAPES)
def test_pack_matches_loop_transcription(out_f, in_f, blocksize, quant_type, double_quant,
                                         dtype):
    w = _weight(out_f, in_f, dtype, seed=out_f + in_f)
    q = ops.nf4_quantize(w, blocksize, double_quant, quant_type)
    gw = ops.nf4_gemv_pack(q)
    codes, absmax = _slow_pack(_slow_codes(q), _slow_group_absmax(q), in_f)
    assert gw.codes.dtype == torch.uint8 and gw.codes.is_contiguous()
    assert gw.absmax.dtype == torch.float32 and gw.absmax.is_contiguous()
    assert torch.equal(gw.codes, codes)
    assert torch.equal(gw.absmax, absmax)
    assert torch.equal(gw.code, q.code)
    assert (gw.shape, gw.dtype, gw.blocksize, gw.quant_type) == (q.shape, dtype, blocksize,
                                                                 quant_type)


@pytest.mark.parametrize("out_f,in_f", [(1, 64), (17, 128), (32, 320)])
def test_pack_every_nibble_value(out_f, in_f):
    """Uniformly random codes and absmax (not only what quantisation produces)."""
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8)
    absmax = torch.rand(out_f, in_f // 64) + 0.5
    packed, scales = R.pack_gemv_tiles(codes, absmax)
    ref_packed, ref_scales = _slow_pack(codes.tolist(), absmax.tolist(), in_f)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(scales, ref_scales)
    back_codes, back_absmax = R.unpack_gemv_tiles(packed, scales, out_f)
    assert back_codes.dtype == torch.uint8 and back_absmax.dtype == torch.float32
    assert torch.equal(back_codes, codes)
    assert torch.equal(back_absmax, absmax)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("out_f,in_f,blocksize", LAYOUT_SHAPES)
def test_unpack_roundtrip_and_dequantize_exact(out_f, in_f, blocksize, quant_type,
                                               double_quant):
    w = _weight(out_f, in_f, torch.bfloat16, seed=3 * out_f)
    q = ops.nf4_quantize(w, blocksize, double_quant, quant_type)
    gw = ops.nf4_gemv_pack(q)
    codes, absmax = R.unpack_gemv_tiles(gw.codes, gw.absmax, out_f)
    assert torch.equal(codes, R.unpack_codes(q.packed, q.numel).view(out_f, in_f))
    assert torch.equal(absmax, torch.tensor(_slow_group_absmax(q)))
    assert gw.dequantize().dtype == torch.bfloat16
    assert torch.equal(gw.dequantize(), ops.nf4_dequantize(q))
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert torch.equal(gw.dequantize(dtype), ops.nf4_dequantize(q, dtype))


def test_repr_to_and_nbytes():
    q = ops.nf4_quantize(_weight(45, 192, torch.float16), 64, double_quant=True)
    gw = ops.nf4_gemv_pack(q)
    assert repr(gw) == ("NF4GemvWeight(shape=(45, 192), dtype=torch.float16, "
                        "quant_type='nf4', blocksize=64, device=cpu)")
    assert (gw.out_features, gw.in_features, gw.device) == (45, 192, torch.device("cpu"))
    tiles, groups = 3, 3
    assert gw.nbytes == tiles * groups * 512 + tiles * groups * 16 * 4 + 16 * 4
    moved = gw.to("meta")
    assert moved.device.type == "meta" and moved.codes.shape == gw.codes.shape
    back = gw.to("cpu")
    assert torch.equal(back.codes, gw.codes) and torch.equal(back.absmax, gw.absmax)
    assert (back.shape, back.dtype, back.blocksize) == (gw.shape, gw.dtype, gw.blocksize)


# --------------------------------------------------------------------------- the linear
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("deltas", [None, torch.int32, torch.int64],
                         ids=["nodelta", "idx32", "idx64"])
@pytest.mark.parametrize("tokens", [1, 5, 16, 20])
@pytest.mark.parametrize("out_f,in_f,blocksize", LINEAR_SHAPES)
def test_small_batch_equals_nf4_weight_path(out_f, in_f, blocksize, tokens, deltas, with_bias):
    w = _weight(out_f, in_f, torch.bfloat16, seed=tokens)
    q = ops.nf4_quantize(w, blocksize, double_quant=True)
    gw = ops.nf4_gemv_pack(q)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
    bias = torch.randn(out_f, dtype=torch.bfloat16) if with_bias else None
    dv = idx = None
    w64 = ops.nf4_dequantize(q, torch.float64)
    if deltas is not None:
        k = w.numel() // 10
        idx = random_unique_indices(w.numel(), k, deltas)
        dv = torch.randn(k) * 0.02
        w64 = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, blocksize, (out_f, in_f),
                                   torch.float64, dv.double(), idx)
    y = ops.nf4_linear_small_batch(x, gw, dv, idx, bias)
    assert y.shape == (tokens, out_f) and y.dtype == torch.bfloat16
    assert torch.equal(y, ops.nf4_linear_small_batch(x, q, dv, idx, bias))
    expected = F.linear(x.double(), w64, None if bias is None else bias.double())
    assert_close(y, expected, torch.bfloat16)


@pytest.mark.parametrize("x_dtype,dv_dtype", [(torch.float16, torch.bfloat16),
                                              (torch.float32, torch.float64),
                                              (torch.float64, torch.float32)])
def test_small_batch_batched_x_unsorted_deltas_and_row_ptr(x_dtype, dv_dtype):
    out_f, in_f = 24, 128
    q = ops.nf4_quantize(_weight(out_f, in_f, torch.float32, seed=9), 64, quant_type="fp4")
    gw = ops.nf4_gemv_pack(q)
    k = 200
    idx = random_unique_indices(out_f * in_f, k, torch.int64, sort=False)
    dv = (torch.randn(k) * 0.05).to(dv_dtype)
    x = torch.randn(2, 3, in_f, dtype=x_dtype)
    y = ops.nf4_linear_small_batch(x, gw, dv, idx)
    assert y.shape == (2, 3, out_f) and y.dtype == x_dtype
    assert torch.equal(y, ops.nf4_linear_small_batch(x, q, dv, idx))
    # what the fallback adds is nf4_dequantize_scatter's rounding, in x's dtype
    merged = ops.nf4_dequantize_scatter(q, dv, idx, x_dtype)
    assert torch.equal(y, F.linear(x, merged))
    rp = ops.nf4_row_pointers(idx.sort().values, out_f, in_f)
    assert torch.equal(ops.nf4_linear_small_batch(x, gw, dv, idx, row_ptr=rp), y)


# --------------------------------------------------------------------------- compiled-kernel glue
class _FakeExtension:
    """Stands in for spft._C: records the nf4_gemv_tiled call, answers with the fallback."""

    def __init__(self) -> None:
        self.calls = []

    def nf4_gemv_tiled(self, x, codes, absmax, code, dv, idx, row_ptr, bias, out_features):
        self.calls.append(dict(x=x, codes=codes, absmax=absmax, code=code, dv=dv, idx=idx,
                               row_ptr=row_ptr, bias=bias, out_features=out_features))
        codes_nk, absmax_rg = R.unpack_gemv_tiles(codes, absmax, out_features)
        base = (code[codes_nk.long()] * absmax_rg.repeat_interleave(64, dim=1)).to(x.dtype)
        if dv is not None:
            base = R.add_deltas(base, dv, idx)
        return F.linear(x, base, bias)


def test_cuda_glue_arguments(monkeypatch):
    """What `_cuda_linear` hands the kernel: an aligned x, int32 row pointers of the sorted
    idx, fp32 deltas, and None for all three without deltas."""
    fake = _FakeExtension()
    monkeypatch.setattr(_backend, "extension", lambda: fake)
    out_f, in_f = 40, 128
    q = ops.nf4_quantize(_weight(out_f, in_f, torch.bfloat16, seed=4), 64, double_quant=True)
    gw = ops.nf4_gemv_pack(q)
    k = 300
    idx = random_unique_indices(out_f * in_f, k, torch.int64)
    dv = torch.randn(k, dtype=torch.float64) * 0.02
    bias = torch.randn(out_f, dtype=torch.bfloat16)
    store = torch.randn(3 * in_f + 1, dtype=torch.bfloat16)
    x = store[1:].view(3, in_f)  # rows not 16-byte aligned: must be copied
    y = nf4_gemv._cuda_linear(x, gw, dv, idx, None, bias)
    call = fake.calls[-1]
    assert call["x"].data_ptr() % 16 == 0 and torch.equal(call["x"], x)
    assert call["codes"] is gw.codes and call["absmax"] is gw.absmax and call["code"] is gw.code
    assert call["row_ptr"].dtype == torch.int32
    assert torch.equal(call["row_ptr"].long(), torch.searchsorted(
        idx, torch.arange(out_f + 1) * in_f))
    assert call["dv"].dtype == torch.float32 and call["idx"] is idx
    assert call["bias"] is bias and call["out_features"] == out_f
    assert torch.equal(y, ops.nf4_linear_small_batch(x, q, dv.float(), idx, bias))
    nf4_gemv._cuda_linear(x.contiguous(), gw, None, None, None, None)
    assert fake.calls[-1]["dv"] is fake.calls[-1]["idx"] is fake.calls[-1]["row_ptr"] is None


def test_cuda_reasons_name_each_limit(monkeypatch):
    monkeypatch.setattr(_backend, "extension", lambda: _FakeExtension())
    q = ops.nf4_quantize(_weight(16, 64, torch.bfloat16), 64)
    gw = ops.nf4_gemv_pack(q)
    assert nf4_gemv._cuda_reasons(torch.randn(16, 64, dtype=torch.bfloat16), gw) == []
    assert any("17 tokens" in r for r in nf4_gemv._cuda_reasons(
        torch.randn(17, 64, dtype=torch.bfloat16), gw))
    assert any("float32" in r for r in nf4_gemv._cuda_reasons(torch.randn(2, 64), gw))
    n, k = 2**16, 2**15  # 2^31 elements: past the kernel's 32-bit offsets
    huge = nf4_gemv.NF4GemvWeight(
        torch.empty(n // 16, k // 64, 32, 16, dtype=torch.uint8, device="meta"),
        torch.empty(n // 16, k // 64, 8, 2, device="meta"), torch.empty(16, device="meta"),
        (n, k), torch.bfloat16, 64, "nf4")
    x = torch.empty(2, k, dtype=torch.bfloat16, device="meta")
    assert any("2^31" in r for r in nf4_gemv._cuda_reasons(x, huge))
    assert nf4_gemv._cuda_reasons(x, nf4_gemv.NF4GemvWeight(
        huge.codes[:-1], huge.absmax[:-1], huge.code, (n - 16, k), torch.bfloat16, 64,
        "nf4")) == []
    monkeypatch.setattr(_backend, "extension", lambda: types.SimpleNamespace())
    assert any("nf4_gemv_tiled" in r for r in nf4_gemv._cuda_reasons(
        torch.randn(2, 64, dtype=torch.bfloat16), gw))


def test_forced_cuda_backend_raises_on_cpu(monkeypatch):
    q = ops.nf4_quantize(_weight(16, 64, torch.bfloat16), 64)
    gw = ops.nf4_gemv_pack(q)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    monkeypatch.setenv("SPFT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="SPFT_BACKEND=cuda"):
        ops.nf4_linear_small_batch(x, gw)
    monkeypatch.setenv("SPFT_BACKEND", "torch")
    assert torch.equal(ops.nf4_linear_small_batch(x, gw), F.linear(x, gw.dequantize()))


# --------------------------------------------------------------------------- bad input
def test_bad_inputs():
    with pytest.raises(ValueError, match="in_features=96 is not a multiple of 64"):
        ops.nf4_gemv_pack(ops.nf4_quantize(_weight(8, 96, torch.bfloat16), 32))
    with pytest.raises(ValueError, match="blocksize=32 < 64"):
        ops.nf4_gemv_pack(ops.nf4_quantize(_weight(8, 64, torch.bfloat16), 32))
    with pytest.raises(ValueError, match="2-D"):
        ops.nf4_gemv_pack(ops.nf4_quantize(_weight(2, 64, torch.bfloat16).view(-1), 64))
    with pytest.raises(TypeError, match="NF4Weight"):
        ops.nf4_gemv_pack(_weight(8, 64, torch.bfloat16))
    with pytest.raises(ValueError, match="in_features=70"):
        R.pack_gemv_tiles(torch.zeros(3, 70, dtype=torch.uint8), torch.zeros(3, 1))
    q = ops.nf4_quantize(_weight(24, 128, torch.bfloat16), 64)
    gw = ops.nf4_gemv_pack(q)
    with pytest.raises(ValueError, match="out_features=40"):
        R.unpack_gemv_tiles(gw.codes, gw.absmax, 40)
    with pytest.raises(ValueError, match="codes must be"):
        nf4_gemv.NF4GemvWeight(gw.codes[:1], gw.absmax, gw.code, (24, 128), torch.bfloat16, 64,
                               "nf4")
    with pytest.raises(ValueError, match="absmax must be"):
        nf4_gemv.NF4GemvWeight(gw.codes, gw.absmax.double(), gw.code, (24, 128),
                               torch.bfloat16, 64, "nf4")
    with pytest.raises(ValueError, match="in_features a positive multiple of 64"):
        nf4_gemv.NF4GemvWeight(gw.codes, gw.absmax, gw.code, (24, 100), torch.bfloat16, 64,
                               "nf4")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="in_features=128"):
        ops.nf4_linear_small_batch(torch.randn(3, 64, dtype=torch.bfloat16), gw)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.nf4_linear_small_batch(x.to(torch.int32), gw)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.nf4_linear_small_batch(x, gw, bias=torch.zeros(23, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="given together"):
        ops.nf4_linear_small_batch(x, gw, dv=torch.zeros(2))
    with pytest.raises(ValueError, match="outside"):
        ops.nf4_linear_small_batch(x, gw, torch.zeros(2), torch.tensor([1, 24 * 128]))
    with pytest.raises(ValueError, match="row_ptr must have shape"):
        ops.nf4_linear_small_batch(x, gw, torch.zeros(2), torch.tensor([1, 5]),
                                   row_ptr=torch.zeros(24, dtype=torch.int32))
