"""`NF4Linear`: a linear layer with a frozen 4-bit (NF4/FP4, bitsandbytes layout) weight, and the
4-bit side of `SparseDeltaLinear` (forward, lossy merge with its re-quantisation error, export).

For users without bitsandbytes: `quantize_model_nf4(model, target_modules)` replaces the target
`nn.Linear`s in place; `SparseDeltaLinear` then wraps them (or bnb `Linear4bit`s) like any linear.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spft.ops as ops
from spft.nn._targets import matches_target, replace_submodule
from spft.ops.nf4 import NF4Weight, as_nf4_weight

_TENSOR_NAMES = ("packed", "absmax", "absmax2", "code2", "offset", "code")


class NF4Linear(nn.Module):
    """`y = x @ dequant(W)ᵀ + b` with W stored 4-bit (0.5 B/element plus the absmax).

    Buffers: the tensors of an `NF4Weight` (packed, absmax, absmax2, code2, offset, code); the
    `weight` property assembles them. `compute_dtype` is the dtype the weight dequantises to
    (the original weight's). Frozen: only the bias (if any) can be trained.
    """

    def __init__(self, weight: NF4Weight, bias: Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.set_weight(weight)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False,
                    quant_type: str = "nf4") -> NF4Linear:
        q = ops.nf4_quantize(linear.weight.detach(), blocksize, double_quant, quant_type)
        return cls(q, linear.bias)

    def set_weight(self, weight: NF4Weight) -> None:
        """Replace the quantised weight (same shape)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match "
                             f"({self.out_features}, {self.in_features})")
        for name, t in zip(_TENSOR_NAMES, weight.tensors()):
            self.register_buffer(name, t)
        self.compute_dtype = weight.dtype
        self.blocksize = weight.blocksize
        self.quant_type = weight.quant_type

    @property
    def weight(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features),
                         self.compute_dtype, self.blocksize, self.quant_type, self.code,
                         self.absmax2, self.code2, self.offset)

    def forward(self, x: Tensor) -> Tensor:
        # Dequantise + GEMM; `spft.ops.nf4_linear_small_batch` is the fused few-token kernel
        # (not the default: still slower on the H100, see benchmarks/RESULTS.md).
        return F.linear(x, ops.nf4_dequantize(self.weight, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_type={self.quant_type!r}, blocksize={self.blocksize}, "
                f"double_quant={self.absmax.dtype == torch.uint8}, bias={self.bias is not None}")


def is_4bit_linear(module: nn.Module) -> bool:
    """An spft `NF4Linear` or a quantised bnb `Linear4bit` (detected without importing bnb)."""
    return isinstance(module, NF4Linear) or \
        getattr(getattr(module, "weight", None), "quant_state", None) is not None


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    if isinstance(module, NF4Linear):
        return module.compute_dtype
    return module.weight.quant_state.dtype


def _set_4bit_weight(module: nn.Module, q: NF4Weight) -> None:
    """Write `q` into an NF4Linear, or into a bnb Linear4bit's Params4bit and quant_state."""
    if isinstance(module, NF4Linear):
        module.set_weight(q)
        return
    param, state = module.weight, module.weight.quant_state
    param.data = q.packed.view(param.data.dtype).view(param.data.shape)
    state.absmax = q.absmax
    if q.double_quant:
        state.state2.absmax = q.absmax2
        state.offset = q.offset


def quantize_model_nf4(model: nn.Module, target_modules: Iterable[str], *, blocksize: int = 64,
                       double_quant: bool = False, quant_type: str = "nf4"
                       ) -> dict[str, NF4Linear]:
    """Replace the target `nn.Linear`s (leaf name such as "q_proj", or a regex over the dotted
    name) with `NF4Linear` in place. Returns {qualified name: new module}."""
    targets = tuple(target_modules)
    replaced: dict[str, NF4Linear] = {}
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and matches_target(name, targets):
            new = NF4Linear.from_linear(module, blocksize, double_quant, quant_type)
            replace_submodule(model, name, new)
            replaced[name] = new
    if not replaced:
        raise ValueError(f"no nn.Linear in the model matches target_modules={targets}")
    return replaced


# --------------------------------------------------------------------------- SparseDeltaLinear
def quantized_weight(module: nn.Module) -> NF4Weight:
    """The 4-bit base weight of a `SparseDeltaLinear` wrapping NF4Linear / Linear4bit."""
    return as_nf4_weight(module.base_4bit.weight)


def requantization_error(exact: Tensor, q: NF4Weight) -> dict[str, float]:
    """How far the 4-bit `q` is from the 16-bit `exact`: max |Δ|, RMS Δ, ‖Δ‖/‖exact‖."""
    diff = ops.nf4_dequantize(q, torch.float32) - exact.float()
    norm = exact.float().norm().item()
    return {"max_abs": diff.abs().max().item() if diff.numel() else 0.0,
            "rms": diff.pow(2).mean().sqrt().item() if diff.numel() else 0.0,
            "rel_fro": diff.norm().item() / norm if norm > 0 else 0.0}


@torch.no_grad()
def merge_4bit(module: nn.Module) -> dict[str, float]:
    """Fold the deltas into the 4-bit base: dequantise, add, re-quantise (same blocksize, quant
    type, double quant). Lossy: returns (and stores as `module.requant_error`) the error of the
    re-quantised weight against the exact 16-bit merged weight. The original 4-bit tensors are
    kept so `unmerge_4bit` restores them exactly."""
    q = quantized_weight(module)
    merged16 = merged_weight_4bit(module, q.dtype)
    new = ops.nf4_quantize(merged16, q.blocksize, q.double_quant, q.quant_type)
    module._nf4_original = q
    _set_4bit_weight(module.base_4bit, new)
    module.requant_error = requantization_error(merged16, new)
    return module.requant_error


@torch.no_grad()
def unmerge_4bit(module: nn.Module) -> None:
    original = getattr(module, "_nf4_original", None)
    if original is None:
        return
    _set_4bit_weight(module.base_4bit, original)
    module._nf4_original = None


@torch.no_grad()
def merged_weight_4bit(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """16-bit W + scatter(dv, idx) (the base dequantised; the module is not modified)."""
    q = quantized_weight(module) if getattr(module, "_nf4_original", None) is None \
        else module._nf4_original
    return ops.nf4_dequantize_scatter(q, module.dv.detach(), module.idx,
                                      dtype or q.dtype, check_indices=False)


def forward_4bit(module: nn.Module, x: Tensor) -> Tensor:
    if getattr(module, "_nf4_original", None) is not None:  # merged: the deltas are in W
        return module.base_4bit(x)
    return ops.sparse_delta_linear_nf4(x, quantized_weight(module), module.dv, module.idx,
                                       module.bias, check_indices=False)
