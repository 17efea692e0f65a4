"""S2FT adapter payloads, built on `spft.s2ft` (issue 5).

Tensors per trained module: `<name>.index` ([s] int32, original channel coordinates; the S2FT
permutation restricted to the trained block) and `<name>.delta` (fp32 block minus base block,
[s, in] or [out, s]); per block `s2ft.ffn_perm.<i>` / `s2ft.group_perm.<i>` (int32, the full
co-permutations). Loading onto an untouched base merges the deltas (W[idx] += delta); loading onto
a model prepared with the same selection (a resumed run) restores the trainable blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _s2ft():
    try:
        import spft.s2ft as s2ft
    except ImportError as e:
        raise NotImplementedError(f"S2FT adapters need spft.s2ft (issue 5): {e}") from None
    return s2ft


def s2ft_payload(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    s2ft = _s2ft()
    adapter = s2ft.export_adapter(model)
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    modules = s2ft.s2_modules(model)
    for name, e in adapter.entries.items():
        m = modules[name]
        tensors[f"{name}.index"] = e.index.to(torch.int32)
        tensors[f"{name}.delta"] = e.delta.float()
        layers[name] = {"shape": [m.out_features, m.in_features], "axis": e.axis,
                        "s": int(e.index.numel()), "index_dtype": "int32"}
    plan = getattr(model, "s2ft_plan", None)
    if plan is not None:
        for i, (fp, gp) in enumerate(zip(plan.ffn_perm, plan.group_perm)):
            tensors[f"s2ft.ffn_perm.{i}"] = fp.to(torch.int32)
            tensors[f"s2ft.group_perm.{i}"] = gp.to(torch.int32)
    extra = {"s2ft_blocks": len(plan.ffn_perm) if plan is not None else 0,
             "n_rep": getattr(plan, "n_rep", None), "head_dim": getattr(plan, "head_dim", None)}
    return tensors, layers, extra


@torch.no_grad()
def load_s2ft(model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any], path: str, *,
              check_base: bool = True) -> nn.Module:
    from spft.adapters.io import AdapterError, _check_fingerprint

    s2ft = _s2ft()
    layers = meta["layers"]
    fps = meta.get("base_fingerprints", {})
    prepared = s2ft.s2_modules(model)
    entries = {}
    for name, lay in layers.items():
        index, delta = tensors.get(f"{name}.index"), tensors.get(f"{name}.delta")
        if index is None or delta is None:
            raise AdapterError(f"{path}: layer {name!r} lacks its index or delta tensor")
        try:
            entries[name] = s2ft.AdapterEntry(lay["axis"], index.long(), delta.float())
        except ValueError as e:
            raise AdapterError(f"{path}: layer {name!r}: {e}") from None
    if prepared:  # a model prepared with the same selection: restore the trainable blocks
        for name, e in entries.items():
            m = prepared.get(name)
            if m is None or m.axis != e.axis or not torch.equal(m.index.cpu(), e.index):
                raise AdapterError(f"{path}: {name} was trained on other S2FT channels than "
                                   "this prepared model selects (different seed or budget?)")
            m.trainable.copy_((m.base_block.float() + e.delta.to(m.weight.device)
                               ).to(m.weight.dtype))
        return model
    for name, lay in layers.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{path}: the model has no module {name!r}: wrong base "
                               "model") from None
        if check_base:
            _check_fingerprint(name, mod, fps.get(name), path, lay["shape"])
    try:
        s2ft.apply_adapter(model, s2ft.S2Adapter(entries, {}))
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{path}: {e}") from None
    return model


def merge_s2ft(model: nn.Module) -> nn.Module:
    """Replace S2FT layers by plain linears in original coordinates (no-op without any)."""
    try:
        import spft.s2ft as s2ft
    except ImportError:
        return model
    if s2ft.s2_modules(model):
        s2ft.restore_original_order(model)
    return model
