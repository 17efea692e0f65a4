"""`SparseDeltaLinear`: an `nn.Linear` plus k trainable deltas at fixed flat indices (SpIEL).

The module wraps the linear it is given without copying its weight: `self.weight` *is* the
linear's Parameter (frozen). It holds `dv` ([k] Parameter, fp32 by default) and `idx` ([k] buffer,
int32 when the weight has < 2**31 elements, sorted ascending and unique).

Two ways to run, same results to rounding:
* materialising (default): each forward builds round(W + scatter(dv)) in a scratch buffer.
* merged in place (`merge()`, 16-bit bases): the weight holds round(W0[idx] + dv) at idx and
  `base_values` keeps W0[idx] in fp32. The forward is a plain GEMM; after each optimizer step
  `refresh()` (or the fused optimizers) re-assigns W[idx] = round(W0[idx] + dv), so no drift.
  `unmerge()` restores W0 exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

import spft.ops as ops
from spft.nn import nf4_linear as nf4
from spft.nn._targets import matches_target, replace_submodule
from spft.ops._validation import check_flat_indices

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")


def sample_unique_indices(numel: int, k: int, *, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.int64) -> Tensor:
    """k distinct uniform random integers in [0, numel), sorted; O(k) memory (never a randperm
    of numel unless k is more than half of it)."""
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, numel={numel}], got {k}")
    if 2 * k > numel:
        chosen = torch.randperm(numel, generator=generator)[:k]
    else:
        chosen = torch.empty(0, dtype=torch.int64)
        while chosen.numel() < k:
            draw = torch.randint(0, numel, (int((k - chosen.numel()) * 1.1) + 16,),
                                 generator=generator)
            chosen = torch.unique(torch.cat([chosen, draw]))
        # unique() sorts, so keep a uniformly random subset of size k, not the k smallest.
        keep = torch.randperm(chosen.numel(), generator=generator)[:k]
        chosen = chosen[keep]
    return chosen.sort().values.to(device=device, dtype=dtype)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


class SparseDeltaLinear(nn.Module):
    """A frozen linear plus trainable sparse deltas: `y = x @ (W + scatter(dv, idx))ᵀ + b`.

    Args:
        base: the `nn.Linear` to wrap (its weight is shared, not copied, and frozen).
        density / num_deltas: how many deltas (exactly one of them), as a fraction of out·in or
            a count.
        dv_dtype: float32 (default) or the weight's dtype.
        generator: RNG for the initial uniform random indices.
    """

    def __init__(self, base: nn.Linear, *, density: float | None = None,
                 num_deltas: int | None = None, dv_dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        four_bit = nf4.is_4bit_linear(base)  # spft NF4Linear or bnb Linear4bit: see nf4_linear
        if not isinstance(base, nn.Linear) and not four_bit:
            raise TypeError(f"base must be an nn.Linear, NF4Linear or bnb Linear4bit, got "
                            f"{type(base).__name__}")
        numel = base.out_features * base.in_features
        if (density is None) == (num_deltas is None):
            raise ValueError("pass exactly one of density or num_deltas")
        if density is not None:
            if not 0.0 <= density <= 1.0:
                raise ValueError(f"density must be in [0, 1], got {density}")
            num_deltas = round(density * numel)
        if not 0 <= num_deltas <= numel:
            raise ValueError(f"num_deltas must be in [0, {numel}], got {num_deltas}")
        w_dtype = nf4.compute_dtype_of(base) if four_bit else base.weight.dtype
        if dv_dtype not in (torch.float32, w_dtype):
            raise TypeError(f"dv_dtype must be float32 or the weight's dtype, got {dv_dtype}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        if isinstance(base.weight, Tensor):
            base.weight.requires_grad_(False)
        self.base_4bit = base if four_bit else None  # 4-bit bases stay a submodule
        self.weight = None if four_bit else base.weight
        self.bias = base.bias
        device = base.weight.device
        self.requant_error = self._nf4_original = None
        idx = sample_unique_indices(numel, num_deltas, generator=generator, device=device,
                                    dtype=_index_dtype(numel))
        self.register_buffer("idx", idx)
        self.dv = nn.Parameter(torch.zeros(num_deltas, dtype=dv_dtype, device=device))
        self.register_buffer("base_values", None)

    @property
    def num_deltas(self) -> int:
        return self.idx.numel()

    @property
    def merged(self) -> bool:
        return self.base_values is not None or self._nf4_original is not None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_deltas={self.num_deltas}, bias={self.bias is not None}, "
                f"merged={self.merged}")

    #: SpIEL-AG candidate statistics (`spft.ops.spiel_ag.CandidateTracker`), set and cleared
    #: by `spft.spiel.SpIELController`; None (default) = plain sparse-delta linear.
    ag_tracker = None

    def forward(self, x: Tensor) -> Tensor:
        tracking = (self.ag_tracker is not None and torch.is_grad_enabled()
                    and self.dv.requires_grad and not (self.base_4bit is not None and self.merged))
        if tracking:
            from spft.ops.spiel_ag import sparse_delta_linear_ag
            weight = self.weight if self.base_4bit is None else nf4.quantized_weight(self)
            return sparse_delta_linear_ag(x, weight, self.dv, self.idx, self.bias,
                                          merged=self.merged and self.base_4bit is None,
                                          tracker=self.ag_tracker)
        if self.base_4bit is not None:
            return nf4.forward_4bit(self, x)
        return ops.sparse_delta_linear(x, self.weight, self.dv, self.idx, self.bias,
                                       merged=self.merged, check_indices=False)

    # ------------------------------------------------------------------ merged mode
    @torch.no_grad()
    def merge(self) -> dict[str, float] | None:
        """Fold the deltas into the weight in place; keep W0[idx] in fp32 for exact unmerge.

        On a 4-bit base: dequantise, add, re-quantise (lossy); returns the re-quantisation error
        (also kept in `requant_error`); the deltas stay but no longer train the forward."""
        if self.merged:
            return self.requant_error
        if self.base_4bit is not None:
            return nf4.merge_4bit(self)
        self.base_values = self.weight.view(-1)[self.idx.long()].float()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-assign W[idx] = round(W0[idx] + dv) after dv changed (merged mode only)."""
        if not self.merged:
            raise RuntimeError("refresh() needs a merged module; call merge() first")
        if self.base_4bit is not None:
            raise RuntimeError("a 4-bit merge is a lossy export; unmerge() and merge() again")
        ops.sparse_delta_refresh_(self.weight, self.base_values, self.dv.detach(), self.idx)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight values at idx exactly."""
        if not self.merged:
            return
        if self.base_4bit is not None:
            return nf4.unmerge_4bit(self)
        self.weight.view(-1).index_copy_(0, self.idx.long(),
                                         self.base_values.to(self.weight.dtype))
        self.base_values = None

    @torch.no_grad()
    def set_indices(self, idx: Tensor, dv: Tensor | None = None) -> None:
        """Replace the index set (and deltas, zero if None), keeping a merged weight consistent.

        idx: [k'] int, unique, in range; stored sorted with the module's index dtype.
        """
        numel = self.out_features * self.in_features
        idx = idx.to(device=self.idx.device)
        is_sorted, _ = check_flat_indices(idx, numel)
        if dv is None:
            dv = torch.zeros(idx.numel(), dtype=self.dv.dtype, device=self.dv.device)
        elif dv.shape != idx.shape:
            raise ValueError(f"dv must have shape {tuple(idx.shape)}, got {tuple(dv.shape)}")
        if not is_sorted:
            order = torch.argsort(idx)
            idx, dv = idx[order], dv[order]
        was_merged = self.merged
        self.unmerge()
        self.idx = idx.to(self.idx.dtype)
        if dv.numel() == self.dv.numel():
            self.dv.data.copy_(dv)
        else:
            self.dv = nn.Parameter(dv.to(self.dv.dtype).clone())
        if was_merged:
            self.merge()

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """A new tensor holding W0 + scatter(dv) (the weight is not modified)."""
        if self.base_4bit is not None:
            return nf4.merged_weight_4bit(self, dtype)
        if self.merged:
            w = self.weight.detach().clone()
        else:
            w = ops.sparse_delta_materialize(self.weight.detach(), self.dv.detach(), self.idx)
        return w.to(dtype) if dtype is not None else w


def apply_sparse_deltas(model: nn.Module, *, target_modules: Iterable[str] = DEFAULT_TARGET_MODULES,
                        density: float | None = None, num_deltas: int | None = None,
                        dv_dtype: torch.dtype = torch.float32, merged: bool = False,
                        seed: int | None = 0) -> dict[str, SparseDeltaLinear]:
    """Replace every target `nn.Linear` of `model` (matched by leaf name such as "q_proj", or by a
    regex over the full dotted name) with a `SparseDeltaLinear` wrapping it in place. All other
    parameters are frozen. Returns {qualified name: new module}.
    """
    targets = tuple(target_modules)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    replaced: dict[str, SparseDeltaLinear] = {}
    for name, module in list(model.named_modules()):
        if (isinstance(module, nn.Linear) or nf4.is_4bit_linear(module)) \
                and not isinstance(module, SparseDeltaLinear) \
                and matches_target(name, targets):
            wrapped = SparseDeltaLinear(module, density=density, num_deltas=num_deltas,
                                        dv_dtype=dv_dtype, generator=generator)
            if merged:
                wrapped.merge()
            replace_submodule(model, name, wrapped)
            replaced[name] = wrapped
    if not replaced:
        raise ValueError(f"no nn.Linear in the model matches target_modules={targets}")
    return replaced


def sparse_delta_modules(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


@torch.no_grad()
def refresh_merged_weights(model: nn.Module) -> None:
    """After an optimizer step: re-assign W[idx] = round(W0 + dv) in every merged module."""
    for module in sparse_delta_modules(model).values():
        if module.merged:
            module.refresh()
