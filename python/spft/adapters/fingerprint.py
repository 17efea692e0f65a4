"""Fingerprints of base weights, so an adapter refuses to load onto a different base model.

A fingerprint hashes a layer's shape and up to 4096 values at evenly spaced flat positions,
rounded to bfloat16 (so the same checkpoint loaded in fp32, fp16 or bf16 agrees). For a merged
`SparseDeltaLinear` the original values W0[idx] are used where a sample hits a delta, so the
fingerprint always describes the *base*, never the fine-tuned weights.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

SAMPLES = 4096


def sample_positions(numel: int, samples: int = SAMPLES) -> Tensor:
    m = min(numel, samples)
    return torch.linspace(0, numel - 1, m, dtype=torch.float64).round().long()


def weight_fingerprint(weight: Tensor, *, idx: Tensor | None = None,
                       base_values: Tensor | None = None) -> str:
    """Hex digest (16 chars) of `weight`'s shape and sampled values.

    idx/base_values: for a weight holding merged deltas — sorted flat indices and their original
    values; samples that hit idx take the original value.
    """
    flat = weight.detach().reshape(-1)
    pos = sample_positions(flat.numel()).to(flat.device)
    vals = flat[pos].float()
    if idx is not None and base_values is not None and idx.numel():
        idx = idx.to(device=flat.device, dtype=torch.long)
        where = torch.searchsorted(idx, pos).clamp_(max=idx.numel() - 1)
        hit = idx[where] == pos
        vals = torch.where(hit, base_values.to(flat.device).float()[where], vals)
    data = vals.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    h = hashlib.sha256(repr(tuple(weight.shape)).encode() + data)
    return h.hexdigest()[:16]


def module_fingerprint(module: nn.Module) -> str:
    """Fingerprint of the base weight of an `nn.Linear` or a spft wrapper around one."""
    from spft.nn import SparseDeltaLinear

    if isinstance(module, SparseDeltaLinear):
        return weight_fingerprint(module.weight, idx=module.idx, base_values=module.base_values)
    base_fp = getattr(module, "base_fingerprint", None)  # wrappers may provide their own
    if callable(base_fp):
        return base_fp()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"cannot fingerprint a {type(module).__name__}: no weight tensor")
    return weight_fingerprint(weight)


def combine(fingerprints: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(fingerprints):
        h.update(f"{name}={fingerprints[name]};".encode())
    return h.hexdigest()[:16]
