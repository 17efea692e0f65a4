"""S2FT adapters in original (un-permuted) coordinates, decoupled from the base model.

An `S2Adapter` maps a module name (``model.layers.3.mlp.down_proj``) to an `AdapterEntry`:
the axis, the original channel indices ``index`` [s] int64, and the dense block ``delta``
(fp32; [s, in] for axis "output" = rows, [out, s] for axis "input" = columns), i.e. the trained
block minus the base block. Typical use:

    adapter = export_adapter(trained_s2ft_model)          # after training with S2Linear
    save_adapter(adapter, "task.safetensors")             # atomic (temp file + os.replace)
    apply_adapter(base_model, load_adapter("task.safetensors"))   # W[:, idx] += delta
    remove_adapter(base_model, adapter)                   # W[:, idx] -= delta
    switch_adapter(base_model, adapter, other)            # remove one, apply the other
    both = fuse_adapters([a, b], weights=[1.0, 1.0])      # union of indices, summed blocks
    with serve_adapters(base_model, [a, b], row_adapter): # different adapters per batch row,
        logits = base_model(input_ids).logits             # no merging (segmented GEMM)

Applying accumulates in fp32 and rounds once to the weight's dtype: with fp32 weights
apply→remove restores the base to fp32 rounding, with bf16 to bf16 rounding (one ulp).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spft.ops.s2 import AXES, s2_adapter_linear
from spft.s2ft.permute import s2_modules


@dataclass
class AdapterEntry:
    axis: str
    index: Tensor  # [s] int64, original coordinates along `axis`, unique
    delta: Tensor  # [s, in] (output) or [out, s] (input), fp32

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        s = self.index.numel()
        got = self.delta.shape[0] if self.axis == "output" else self.delta.shape[1]
        if self.index.dim() != 1 or self.delta.dim() != 2 or got != s:
            want = "[s, in]" if self.axis == "output" else "[out, s]"
            raise ValueError(f"index [s] and delta {want} "
                             f"disagree: {tuple(self.index.shape)} vs {tuple(self.delta.shape)}")
        if self.index.unique().numel() != s:
            raise ValueError("adapter index holds duplicate channels")


@dataclass
class S2Adapter:
    entries: dict[str, AdapterEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # identifies applied copies


def export_adapter(model: nn.Module, metadata: dict[str, str] | None = None) -> S2Adapter:
    """The trained S2FT blocks of `model` (from `prepare_s2ft`) in original coordinates."""
    entries = {name: AdapterEntry(m.axis, m.index.detach().cpu().clone(), m.delta().float().cpu())
               for name, m in s2_modules(model).items()}
    if not entries:
        raise ValueError("model has no S2Linear modules: call prepare_s2ft and train first")
    return S2Adapter(entries, dict(metadata or {}))


def _target(model: nn.Module, name: str, entry: AdapterEntry) -> nn.Linear:
    try:
        mod = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"adapter module {name!r} not found in the model") from exc
    w = getattr(mod, "weight", None)
    if w is None or w.dim() != 2:
        raise TypeError(f"{name} is not a linear layer with a 2-D weight")
    if type(mod).__name__ == "S2Linear":
        raise TypeError(f"{name} is an S2Linear (permuted): apply adapters to an untouched base")
    out, n_in = w.shape
    limit = out if entry.axis == "output" else n_in
    want = (entry.index.numel(), n_in) if entry.axis == "output" else (out, entry.index.numel())
    if tuple(entry.delta.shape) != want:
        raise ValueError(f"{name}: delta shape {tuple(entry.delta.shape)} != {want}")
    if entry.index.numel() and (int(entry.index.min()) < 0 or int(entry.index.max()) >= limit):
        raise ValueError(f"{name}: adapter indices outside [0, {limit})")
    return mod


@torch.no_grad()
def _add_(model: nn.Module, adapter: S2Adapter, scale: float, keep: bool) -> None:
    targets = {n: _target(model, n, e) for n, e in adapter.entries.items()}  # validate all first
    for name, e in adapter.entries.items():
        mod = targets[name]
        w = mod.weight
        dim = 0 if e.axis == "output" else 1
        idx = e.index.to(w.device)
        old = w.index_select(dim, idx)
        if keep:  # the overwritten block, so remove_adapter can restore it bit for bit
            stack = mod.__dict__.setdefault("_s2ft_applied", [])
            stack.append((adapter.key, old))
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        block = old.to(acc) + scale * e.delta.to(w.device, acc)
        w.index_copy_(dim, idx, block.to(w.dtype))


def apply_adapter(model: nn.Module, adapter: S2Adapter, scale: float = 1.0,
                  keep_original: bool = True) -> nn.Module:
    """In place: ``W[idx] += scale·delta`` (rows or columns) for every entry, accumulated in
    fp32 (fp64 for fp64 weights) and rounded once to the weight's dtype. `model` must hold plain
    nn.Linear layers (an untouched base). With ``keep_original`` the overwritten blocks are kept
    (s channels per module) so that `remove_adapter` restores the base exactly."""
    _add_(model, adapter, scale, keep_original)
    return model


@torch.no_grad()
def remove_adapter(model: nn.Module, adapter: S2Adapter) -> nn.Module:
    """In place: undo `apply_adapter`. Where this adapter is the last one applied to a module
    and its original block was kept, the block is restored exactly; otherwise (out-of-order
    removal) the delta is subtracted (to one rounding of the weight's dtype)."""
    targets = {n: _target(model, n, e) for n, e in adapter.entries.items()}
    for name, e in adapter.entries.items():
        mod = targets[name]
        stack = mod.__dict__.get("_s2ft_applied", [])
        keys = [k for k, _ in stack]
        if stack and keys[-1] == adapter.key:
            _, old = stack.pop()
            mod.weight.index_copy_(0 if e.axis == "output" else 1,
                                   e.index.to(mod.weight.device), old)
            continue
        if adapter.key in keys:
            # blocks kept by adapters applied later contain this delta: they can no longer be
            # restored verbatim, so those adapters fall back to subtraction too
            del stack[keys.index(adapter.key):]
        _add_(model, S2Adapter({name: e}, key=adapter.key), -1.0, False)
    return model


def switch_adapter(model: nn.Module, current: S2Adapter | None, new: S2Adapter | None
                   ) -> nn.Module:
    """Remove `current` (if any) and apply `new` (if any)."""
    if current is not None:
        remove_adapter(model, current)
    if new is not None:
        apply_adapter(model, new)
    return model


def fuse_adapters(adapters: Sequence[S2Adapter], weights: Sequence[float] | None = None
                  ) -> S2Adapter:
    """One adapter equal to Σ weights[k]·adapters[k] (union of channels per module)."""
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError("weights must have one entry per adapter")
    names = sorted({n for a in adapters for n in a.entries})
    fused = {}
    for name in names:
        parts = [(w, a.entries[name]) for w, a in zip(weights, adapters) if name in a.entries]
        axes = {e.axis for _, e in parts}
        if len(axes) != 1:
            raise ValueError(f"{name}: adapters disagree on the axis {axes}")
        axis = axes.pop()
        dim = 0 if axis == "output" else 1
        index = torch.cat([e.index for _, e in parts]).unique(sorted=True)
        other = parts[0][1].delta.shape[1 - dim]
        shape = (index.numel(), other) if dim == 0 else (other, index.numel())
        delta = torch.zeros(shape, dtype=torch.float32)
        for w, e in parts:
            pos = torch.searchsorted(index, e.index)
            delta.index_add_(dim, pos, w * e.delta.float())
        fused[name] = AdapterEntry(axis, index, delta)
    return S2Adapter(fused, {"fused_from": str(len(adapters))})


# --------------------------------------------------------------------------- files
def save_adapter(adapter: S2Adapter, path: str | os.PathLike) -> None:
    """Write `adapter` as safetensors, atomically (temp file in the same folder + os.replace)."""
    from safetensors.torch import save_file
    tensors, axes = {}, {}
    for name, e in adapter.entries.items():
        tensors[f"{name}.index"] = e.index.contiguous()
        tensors[f"{name}.delta"] = e.delta.contiguous()
        axes[name] = e.axis
    meta = {"format": "spft-s2ft-adapter-v1", "axes": json.dumps(axes),
            "metadata": json.dumps(adapter.metadata)}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_adapter(path: str | os.PathLike) -> S2Adapter:
    from safetensors import safe_open
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "spft-s2ft-adapter-v1":
            raise ValueError(f"{path} is not an spft S2FT adapter file")
        axes = json.loads(meta["axes"])
        entries = {n: AdapterEntry(a, f.get_tensor(f"{n}.index"), f.get_tensor(f"{n}.delta"))
                   for n, a in axes.items()}
    return S2Adapter(entries, json.loads(meta.get("metadata", "{}")))


# --------------------------------------------------------------------------- serving
@contextlib.contextmanager
def serve_adapters(model: nn.Module, adapters: Sequence[S2Adapter], row_adapter: Tensor
                   ) -> Iterator[nn.Module]:
    """Within the block, every adapted linear of `model` (an untouched base) runs
    `spft.ops.s2_adapter_linear`: batch row b uses ``adapters[row_adapter[b]]`` (-1: none),
    never merging weights. Inputs must be [B, ..., in] with B = len(row_adapter)."""
    names = sorted({n for a in adapters for n in a.entries})
    originals = {}
    for name in names:
        parts = [a.entries.get(name) for a in adapters]
        axes = {e.axis for e in parts if e is not None}
        if len(axes) != 1:
            raise ValueError(f"{name}: adapters disagree on the axis {axes}")
        axis = axes.pop()
        mod = _target(model, name, next(e for e in parts if e is not None))
        dev = mod.weight.device
        empty_delta = (lambda w: w.new_zeros((0, w.shape[1]))) if axis == "output" else \
            (lambda w: w.new_zeros((w.shape[0], 0)))
        idx = [e.index.to(dev) if e is not None else torch.zeros(0, dtype=torch.int64, device=dev)
               for e in parts]
        dts = [e.delta.to(dev, mod.weight.dtype) if e is not None else empty_delta(mod.weight)
               for e in parts]

        def forward(x, _mod=mod, _idx=idx, _dts=dts, _axis=axis):
            lead = x.shape[:-1]
            rows = row_adapter.to(x.device).repeat_interleave(x[0].numel() // x.shape[-1])
            y = s2_adapter_linear(x.reshape(-1, x.shape[-1]), _mod.weight, _mod.bias, rows,
                                  _idx, _dts, _axis)
            return y.view(*lead, y.shape[-1])

        originals[name] = mod.forward
        mod.forward = forward
    try:
        yield model
    finally:
        for name, fwd in originals.items():
            mod = model.get_submodule(name)
            if mod.forward is not fwd:
                del mod.forward
