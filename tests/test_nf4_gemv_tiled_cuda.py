"""The compiled small-batch GEMV on the serving layout (`spft._C.nf4_gemv_tiled`,
csrc/nf4_gemv_tiled.cu) against the float64 reference, on CUDA only: rows that are not a multiple
of 16, K not a multiple of a warp's share, every launch configuration, both x dtypes, NF4 and
FP4, double quantisation, int32/int64 indices, bad input and inconsistent row pointers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, nf4_gemv_case

import spft.ops as ops

pytestmark = pytest.mark.gpu


def _case(*args, **kwargs):
    """`nf4_gemv_case` with the weight also packed: (q, packed, idx, dv, x, bias, w_ref)."""
    q, *rest = nf4_gemv_case(*args, **kwargs)
    return (q, ops.nf4_gemv_pack(q), *rest)


def _call(ext, x, p, dv, idx, rp, bias, out_f, config=(0, 0, 0, 0, 0, 0),
          split_parts=-1, stage_x=-1, deltas_apart=-1):
    return ext.nf4_gemv_tiled(x, p.codes, p.absmax, p.code, dv, idx, rp, bias, out_f, *config,
                              split_parts=split_parts, stage_x=stage_x, deltas_apart=deltas_apart)


@pytest.mark.parametrize("out_f,in_f,blocksize", [
    pytest.param(45, 192, 64, id="45x192-b64"),        # partial row tile, 3 groups
    pytest.param(16, 64, 64, id="16x64-b64"),          # one tile, one group
    pytest.param(130, 1088, 256, id="130x1088-b256"),  # 17 groups: uneven split over warps
    pytest.param(90, 320, 128, id="90x320-b128"),      # absmax blocks straddle rows
    pytest.param(33, 4096, 4096, id="33x4096-b4096"),  # absmax blocks span whole rows
])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
def test_tiled_gemv_matches_reference(cuda_gemv, out_f, in_f, blocksize, tokens, dtype,
                                      double_quant):
    q, p, idx, dv, x, bias, w_ref = _case(out_f, in_f, blocksize, tokens=tokens, dtype=dtype,
                                          double_quant=double_quant, seed=tokens)
    y = ops.nf4_linear_small_batch(x, p, dv, idx, bias)
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    assert_close(y, F.linear(x.double(), w_ref, bias.double()), dtype)
    no_delta = F.linear(x.double(), ops.nf4_dequantize(q, torch.float64))
    assert_close(ops.nf4_linear_small_batch(x, p), no_delta, dtype)


@pytest.mark.parametrize("tokens", [1, 7, 16])
@pytest.mark.parametrize("in_f", [64 * 13, 64 * 64, 64 * 3])
def test_tiled_gemv_every_config(cuda_gemv, tokens, in_f):
    """Every compiled config on 13, 64 and 3 groups per row: runs that the warps and the slots
    of U groups do not split evenly, and warps left without groups; the deltas' x gathered from
    global memory and from the transposed copy staged in shared memory; and the deltas summed
    apart, by a kernel of their own."""
    out_f = 200
    _, p, idx, dv, x, bias, w_ref = _case(out_f, in_f, 64, tokens=tokens, seed=3)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    expected = F.linear(x.double(), w_ref, bias.double())
    for config in cuda_gemv.nf4_gemv_tiled_configs():
        for stage_x, apart in ((-1, 0), (0, 0), (1, 0), (-1, 1)):
            y = _call(cuda_gemv, x, p, dv, idx, rp, bias, out_f, tuple(config), stage_x=stage_x,
                      deltas_apart=apart)
            assert_close(y, expected, torch.bfloat16,
                         msg=f"config {config} stage_x {stage_x} deltas_apart {apart}")


@pytest.mark.parametrize("split_parts", [0, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("in_f", [64 * 13, 64])
def test_tiled_gemv_split_tiles(cuda_gemv, split_parts, tokens, in_f):
    """Tail tiles split along K over 2, 4 or 8 blocks (fewer tiles than SMs: all of them are the
    tail), with every compiled config, deltas and bias: parts of uneven length, and parts left
    without groups (one group per row). Called three times, the second with the deltas summed
    apart: each call reuses the last one's workspace memory with its counters left at the end of
    a round."""
    out_f = 200
    _, p, idx, dv, x, bias, w_ref = _case(out_f, in_f, 64, tokens=tokens, seed=11)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    expected = F.linear(x.double(), w_ref, bias.double())
    for config in cuda_gemv.nf4_gemv_tiled_configs():
        for apart in (0, 1, 0):
            y = _call(cuda_gemv, x, p, dv, idx, rp, bias, out_f, tuple(config), split_parts,
                      deltas_apart=apart)
            assert_close(y, expected, torch.bfloat16, msg=f"config {config} deltas_apart {apart}")


@pytest.mark.parametrize("tokens", [2, 12])
def test_tiled_gemv_split_tail_of_many_tiles(cuda_gemv, tokens):
    """More tiles than SMs (two per SM plus a tail, the last one partial), every config, the
    automatic split, none and 4 parts: blocks of several tile groups then have work in more
    than their first group."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out_f, in_f = 16 * (2 * sms + 5) - 3, 1024
    _, p, idx, dv, x, bias, w_ref = _case(out_f, in_f, 64, tokens=tokens, seed=12)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    expected = F.linear(x.double(), w_ref, bias.double())
    for config in cuda_gemv.nf4_gemv_tiled_configs():
        for split_parts, stage_x, apart in ((-1, -1, -1), (0, 0, 0), (4, 1, 0), (-1, 1, 0),
                                            (4, -1, 1), (-1, -1, 1)):
            y = _call(cuda_gemv, x, p, dv, idx, rp, bias, out_f, tuple(config), split_parts,
                      stage_x, apart)
            assert_close(y, expected, torch.bfloat16,
                         msg=f"config {config} split_parts {split_parts} stage_x {stage_x} "
                             f"deltas_apart {apart}")


@pytest.mark.parametrize("tokens", [1, 4])
def test_tiled_gemv_default_beyond_six_tiles_per_sm(cuda_gemv, tokens):
    """More than six row tiles per SM: the default then takes one tile per block (and the
    automatic tail split declines: the grid no longer fits at once)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out_f, in_f = 16 * (6 * sms + 3) - 5, 256
    _, p, idx, dv, x, bias, w_ref = _case(out_f, in_f, 64, tokens=tokens, seed=13)
    y = ops.nf4_linear_small_batch(x, p, dv, idx, bias)
    assert_close(y, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dv_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tiled_gemv_index_and_delta_dtypes(cuda_gemv, idx_dtype, dv_dtype, quant_type):
    out_f, in_f = 96, 512
    _, p, idx, dv, x, bias, w_ref = _case(out_f, in_f, 64, tokens=5, idx_dtype=idx_dtype,
                                          dv_dtype=dv_dtype, quant_type=quant_type,
                                          double_quant=False, density=0.2, seed=4)
    rp64 = ops.nf4_row_pointers(idx, out_f, in_f).long()
    y = ops.nf4_linear_small_batch(x, p, dv, idx, bias, row_ptr=rp64)
    assert_close(y, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)


def test_tiled_gemv_dense_deltas_strided_x(cuda_gemv):
    """60% density (many entries per lane of a row's group) and x rows that are neither
    contiguous nor 16-byte aligned (the op copies them)."""
    out_f, in_f = 70, 256
    _, p, idx, dv, _, bias, w_ref = _case(out_f, in_f, 64, tokens=1, density=0.6, seed=7)
    store = torch.randn(2, 3, in_f + 8, dtype=torch.bfloat16, device="cuda")
    x = store[..., 1:in_f + 1]
    y = ops.nf4_linear_small_batch(x, p, dv, idx, bias)
    assert y.shape == (2, 3, out_f)
    assert_close(y, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)


def test_tiled_gemv_agrees_with_bnb_layout_kernel(cuda_gemv):
    """The two compiled kernels compute the same function (up to rounding order)."""
    out_f, in_f = 300, 1024
    q, p, idx, dv, x, bias, w_ref = _case(out_f, in_f, 64, tokens=4, seed=9)
    y_tiled = ops.nf4_linear_small_batch(x, p, dv, idx, bias)
    y_bnb = ops.nf4_linear_small_batch(x, q, dv, idx, bias)
    expected = F.linear(x.double(), w_ref, bias.double())
    assert_close(y_tiled, expected, torch.bfloat16)
    assert_close(y_bnb, expected, torch.bfloat16)


def test_tiled_gemv_inconsistent_row_ptr_stays_in_bounds(cuda_gemv):
    out_f, in_f = 48, 256
    _, p, idx, dv, x, _, _ = _case(out_f, in_f, 64, tokens=2, seed=6)
    bad = torch.full((out_f + 1,), 10 * idx.numel(), dtype=torch.int32, device="cuda")
    bad[0] = -5
    y = _call(cuda_gemv, x, p, dv, idx, bad, None, out_f)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    shuffled = idx[torch.randperm(idx.numel(), device="cuda")]
    y = _call(cuda_gemv, x, p, dv, shuffled, rp, None, out_f)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()


def test_tiled_gemv_bad_input(cuda_gemv):
    out_f, in_f = 32, 128
    _, p, idx, dv, x, bias, _ = _case(out_f, in_f, 64, tokens=2, double_quant=False)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    with pytest.raises(ValueError, match="codes"):
        cuda_gemv.nf4_gemv_tiled(x, p.codes[:1], p.absmax, p.code, dv, idx, rp, bias, out_f)
    with pytest.raises(ValueError, match="codes"):
        _call(cuda_gemv, x, p, dv, idx, rp, bias, out_f + 16)  # the layout of another N
    with pytest.raises(ValueError, match="absmax"):
        cuda_gemv.nf4_gemv_tiled(x, p.codes, p.absmax[:, :1], p.code, dv, idx, rp, bias, out_f)
    with pytest.raises(ValueError, match="multiple of 64"):
        cuda_gemv.nf4_gemv_tiled(x[:, :96].contiguous(), p.codes, p.absmax, p.code, None, None,
                                 None, None, out_f)
    with pytest.raises(ValueError, match="tokens"):
        _call(cuda_gemv, torch.randn(17, in_f, dtype=torch.bfloat16, device="cuda"), p, dv, idx,
              rp, bias, out_f)
    with pytest.raises(TypeError, match="x must be"):
        _call(cuda_gemv, x.float(), p, dv, idx, rp, bias, out_f)
    with pytest.raises(TypeError, match="idx"):
        _call(cuda_gemv, x, p, dv, idx.to(torch.int16), rp, bias, out_f)
    with pytest.raises(ValueError, match="needs idx and row_ptr"):
        _call(cuda_gemv, x, p, dv, idx, None, bias, out_f)
    with pytest.raises(ValueError, match="code must be on"):
        cuda_gemv.nf4_gemv_tiled(x, p.codes, p.absmax, p.code.cpu(), dv, idx, rp, bias, out_f)
    with pytest.raises(ValueError, match="no compiled tiled kernel"):
        _call(cuda_gemv, x, p, dv, idx, rp, bias, out_f, (3, 5, 2, 0))
    with pytest.raises(ValueError, match="split_parts"):
        _call(cuda_gemv, x, p, dv, idx, rp, bias, out_f, split_parts=3)
    with pytest.raises(ValueError, match="stage_x"):
        _call(cuda_gemv, x, p, dv, idx, rp, bias, out_f, stage_x=2)
    with pytest.raises(ValueError, match="deltas_apart"):
        _call(cuda_gemv, x, p, dv, idx, rp, bias, out_f, deltas_apart=2)


@pytest.mark.parametrize("tokens", [4, 13])
def test_tiled_gemv_in_cuda_graph(cuda_gemv, tokens):
    """Captured and replayed three times on new x: 16 tiles, fewer than the SMs, so the automatic
    split runs, and every replay reuses one epoch on the same counters. At 13 tokens x is
    transposed into the workspace and the deltas are summed apart, by kernels the GEMV overlaps
    (programmatic dependent launch): each replay must see its own x there."""
    out_f, in_f = 256, 1024
    _, p, idx, dv, x, bias, w_ref = _case(out_f, in_f, 64, tokens=tokens, seed=7)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.nf4_linear_small_batch(x, p, dv, idx, bias, row_ptr=rp, check_indices=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.nf4_linear_small_batch(x, p, dv, idx, bias, row_ptr=rp, check_indices=False)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)
