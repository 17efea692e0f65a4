"""The compiled small-batch 4-bit GEMV (`spft._C.nf4_gemv`, csrc/nf4_gemv.cu) against the float64
reference, on CUDA only: odd shapes, every launch configuration, both x dtypes, NF4 and FP4,
double quantisation, int32/int64 indices, bad input and inconsistent row pointers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, nf4_gemv_case

import spft.ops as ops

pytestmark = pytest.mark.gpu


_case = nf4_gemv_case


@pytest.mark.parametrize("out_f,in_f,blocksize", [
    pytest.param(45, 192, 64, id="45x192-b64"),        # rows and K chunks both partial
    pytest.param(17, 64, 32, id="17x64-b32"),
    pytest.param(130, 1056, 256, id="130x1056-b256"),
    pytest.param(90, 320, 128, id="90x320-b128"),      # absmax blocks straddle rows
    pytest.param(33, 4096, 4096, id="33x4096-b4096"),  # absmax blocks span whole rows
])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
def test_cuda_gemv_matches_reference(cuda_gemv, out_f, in_f, blocksize, tokens, dtype,
                                     double_quant):
    q, idx, dv, x, bias, w_ref = _case(out_f, in_f, blocksize, tokens=tokens, dtype=dtype,
                                       double_quant=double_quant, seed=tokens)
    expected = F.linear(x.double(), w_ref, bias.double())
    y = ops.nf4_linear_small_batch(x, q, dv, idx, bias)
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    assert_close(y, expected, dtype)
    no_delta = F.linear(x.double(), ops.nf4_dequantize(q, torch.float64))
    assert_close(ops.nf4_linear_small_batch(x, q), no_delta, dtype)


@pytest.mark.parametrize("tokens", [1, 7, 16])
@pytest.mark.parametrize("in_f,blocksize", [(1184, 64), (1216, 64), (1152, 128)])
def test_cuda_gemv_every_config(cuda_gemv, tokens, in_f, blocksize):
    """Every compiled launch config, on K = 9.25, 9.5 and 9 chunks of 128 inputs: partial last
    chunks and chunk counts that the warps of a block do not split evenly."""
    out_f = 200
    q, idx, dv, x, bias, w_ref = _case(out_f, in_f, blocksize, tokens=tokens, seed=3)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    expected = F.linear(x.double(), w_ref, bias.double())
    configs = cuda_gemv.nf4_gemv_configs()
    assert tuple(cuda_gemv.nf4_gemv_default_config(tokens)) in map(tuple, configs)
    for config in configs:
        y = cuda_gemv.nf4_gemv(x, q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.code, dv,
                               idx, rp, bias, blocksize, out_f, *config)
        assert_close(y, expected, torch.bfloat16, msg=f"config {config}")


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dv_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_gemv_index_and_delta_dtypes(cuda_gemv, idx_dtype, dv_dtype, quant_type):
    out_f, in_f, blocksize = 96, 512, 64
    q, idx, dv, x, bias, w_ref = _case(out_f, in_f, blocksize, tokens=5, idx_dtype=idx_dtype,
                                       dv_dtype=dv_dtype, quant_type=quant_type,
                                       double_quant=False, density=0.2, seed=4)
    rp64 = ops.nf4_row_pointers(idx, out_f, in_f).long()  # an int64 row_ptr is accepted too
    y = ops.nf4_linear_small_batch(x, q, dv, idx, bias, row_ptr=rp64)
    assert_close(y, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dv_dtype", [torch.float32, torch.float16])
def test_cuda_gemv_dense_deltas_and_unaligned_arrays(cuda_gemv, idx_dtype, dv_dtype):
    """Rows with many deltas (60% density: each lane of a row's group takes many entries) and
    idx / dv views that are not 16-byte aligned, under every launch config."""
    out_f, in_f, blocksize = 70, 256, 64
    q, idx, dv, x, bias, w_ref = _case(out_f, in_f, blocksize, tokens=3, idx_dtype=idx_dtype,
                                       dv_dtype=dv_dtype, density=0.6, seed=7)
    expected = F.linear(x.double(), w_ref, bias.double())
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    idx_store = torch.empty(idx.numel() + 1, dtype=idx_dtype, device="cuda")
    dv_store = torch.empty(dv.numel() + 1, dtype=dv_dtype, device="cuda")
    idx_store[1:] = idx
    dv_store[1:] = dv
    unaligned = (idx_store[1:], dv_store[1:])
    assert unaligned[0].data_ptr() % 16 and unaligned[1].data_ptr() % 16
    for config in cuda_gemv.nf4_gemv_configs():
        for i, d in ((idx, dv), unaligned):
            y = cuda_gemv.nf4_gemv(x, q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.code,
                                   d, i, rp, bias, blocksize, out_f, *config)
            assert_close(y, expected, torch.bfloat16, msg=f"config {config}")


def test_cuda_gemv_strided_and_batched_x(cuda_gemv):
    out_f, in_f, blocksize = 64, 256, 64
    q, idx, dv, _, _, w_ref = _case(out_f, in_f, blocksize, tokens=1, seed=5)
    store = torch.randn(2, 3, in_f + 8, dtype=torch.bfloat16, device="cuda")
    x = store[..., 1:in_f + 1]  # rows neither contiguous nor 16-byte aligned
    y = ops.nf4_linear_small_batch(x, q, dv, idx)
    assert y.shape == (2, 3, out_f)
    assert_close(y, F.linear(x.double(), w_ref), torch.bfloat16)


def test_cuda_gemv_with_bitsandbytes_weight(cuda_gemv):
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(160, 640, dtype=torch.bfloat16) * 0.02
    layer = bnb.nn.Linear4bit(640, 160, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.cuda()
    x = torch.randn(4, 640, dtype=torch.bfloat16, device="cuda")
    expected = F.linear(x.double(), ops.nf4_dequantize(layer.weight, torch.float64))
    assert_close(ops.nf4_linear_small_batch(x, layer.weight), expected, torch.bfloat16)


def test_cuda_gemv_inconsistent_row_ptr_stays_in_bounds(cuda_gemv):
    """A row pointer that does not describe idx gives a wrong answer, never a bad access."""
    out_f, in_f, blocksize = 48, 256, 64
    q, idx, dv, x, _, _ = _case(out_f, in_f, blocksize, tokens=2, seed=6)
    bad = torch.full((out_f + 1,), 10 * idx.numel(), dtype=torch.int32, device="cuda")
    bad[0] = -5
    y = cuda_gemv.nf4_gemv(x, q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.code, dv, idx,
                           bad, None, blocksize, out_f)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    # Unsorted indices with a row pointer of the sorted ones: wrong, but in bounds.
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    shuffled = idx[torch.randperm(idx.numel(), device="cuda")]
    y = cuda_gemv.nf4_gemv(x, q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.code, dv,
                           shuffled, rp, None, blocksize, out_f)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()


def test_cuda_gemv_bad_input(cuda_gemv):
    out_f, in_f, blocksize = 32, 128, 64
    q, idx, dv, x, bias, _ = _case(out_f, in_f, blocksize, tokens=2, double_quant=False)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    args = [x, q.packed, q.absmax, None, None, None, q.code, dv, idx, rp, bias, blocksize, out_f]

    def call(**changes):
        names = ["x", "packed", "absmax", "absmax2", "code2", "offset", "code", "dv", "idx",
                 "row_ptr", "bias", "blocksize", "out_features"]
        values = dict(zip(names, args))
        values.update(changes)
        return cuda_gemv.nf4_gemv(*values.values())

    with pytest.raises(ValueError, match="packed"):
        call(packed=q.packed[:-16])
    with pytest.raises(ValueError, match="absmax"):
        call(absmax=q.absmax[:-1])
    with pytest.raises(ValueError, match="blocksize"):
        call(blocksize=48)
    with pytest.raises(ValueError, match="tokens"):
        call(x=torch.randn(17, in_f, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(TypeError, match="x must be"):
        call(x=x.float())
    with pytest.raises(TypeError, match="idx"):
        call(idx=idx.to(torch.int16))
    with pytest.raises(ValueError, match="needs idx and row_ptr"):
        call(row_ptr=None)
    with pytest.raises(ValueError, match="code must be on"):
        call(code=q.code.cpu())
    with pytest.raises(ValueError, match="no compiled kernel"):
        cuda_gemv.nf4_gemv(*args, 3, 4, 2)
    # Through the op: SPFT_BACKEND=cuda refuses what the kernel cannot serve, naming why.
    with pytest.raises(RuntimeError, match="multiple of 32"):
        q2, *_ = _case(8, 48, 32, tokens=1)
        ops.nf4_linear_small_batch(torch.randn(1, 48, dtype=torch.bfloat16, device="cuda"), q2)


def test_cuda_gemv_in_cuda_graph(cuda_gemv):
    out_f, in_f, blocksize = 256, 1024, 64
    q, idx, dv, x, bias, w_ref = _case(out_f, in_f, blocksize, tokens=4, seed=7)
    rp = ops.nf4_row_pointers(idx, out_f, in_f)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.nf4_linear_small_batch(x, q, dv, idx, bias, row_ptr=rp, check_indices=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.nf4_linear_small_batch(x, q, dv, idx, bias, row_ptr=rp, check_indices=False)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 16, 17])
def test_inference_linear_uses_the_kernel_and_agrees(cuda_gemv, monkeypatch, tokens):
    """Without gradients, `sparse_delta_linear_nf4` serves ≤ 16 tokens with the compiled kernel;
    its output matches the materialise + GEMM path at bf16 tolerance."""
    import spft.ops.nf4 as nf4_ops
    out_f, in_f, blocksize = 96, 512, 64
    q, idx, dv, _, bias, w_ref = _case(out_f, in_f, blocksize, tokens=1, seed=8)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16, device="cuda")
    calls = []
    real = nf4_ops._cuda_gemv
    monkeypatch.setattr(nf4_ops, "_cuda_gemv", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y = ops.sparse_delta_linear_nf4(x, q, dv, idx, bias)
    assert len(calls) == (1 if tokens <= 16 else 0)
    assert_close(y, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)
    y_grad = ops.sparse_delta_linear_nf4(x, q, dv.requires_grad_(), idx, bias)
    assert len(calls) == (1 if tokens <= 16 else 0)  # training calls keep the autograd path
    assert_close(y_grad, F.linear(x.double(), w_ref, bias.double()), torch.bfloat16)
