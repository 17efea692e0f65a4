"""Adapter files: safetensors tensors + metadata, written atomically, checked on load.

Layout of a SpIEL adapter (method "spiel-ag", "spiel-ma" or "spiel"): for each target layer
`<name>.idx` ([k] int32 when out·in < 2**31, else int64; sorted, unique flat row-major offsets)
and `<name>.dv` ([k] float32 deltas). Full fine-tuning and LoRA adapters store their trainable
tensors by parameter name. The safetensors metadata (all strings) holds:

* `format` = "spft-adapter/1", `spft_version`, `method`;
* `layers`: JSON {layer: {"shape": [out, in], "num_deltas": k, "index_dtype": "int32",
  "fingerprint": base-weight fingerprint}};
* `fingerprint`: the combined base fingerprint; `extra`: JSON the method adds (e.g. S2FT's
  permutation).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from torch import Tensor, nn

from spft.adapters.fingerprint import combine, module_fingerprint
from spft.nn._targets import replace_submodule

FORMAT = "spft-adapter/1"
SPIEL_METHODS = ("spiel", "spiel-ag", "spiel-ma", "qspiel")


class AdapterError(ValueError):
    """An adapter file is unreadable, inconsistent, or does not fit the given model."""


def _version() -> str:
    from spft import __version__
    return __version__


# --------------------------------------------------------------------------- writing
def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike,
                            metadata: dict[str, str]) -> None:
    """Write `tensors` to `path` via a temporary file in the same directory + fsync + rename,
    so a crash never leaves a half-written adapter under the final name."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_4bit(module: nn.Module) -> bool:
    return getattr(module, "base_4bit", None) is not None or \
        not isinstance(getattr(module, "weight", None), Tensor)


def _spiel_payload(model: nn.Module, base_fingerprints: dict[str, str] | None
                   ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from spft.nn import sparse_delta_modules

    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    for name, m in sparse_delta_modules(model).items():
        numel = m.out_features * m.in_features
        idx_dtype = torch.int32 if numel < 2**31 else torch.int64
        tensors[f"{name}.idx"] = m.idx.to(idx_dtype)
        tensors[f"{name}.dv"] = m.dv.detach().float()
        layers[name] = {"shape": [m.out_features, m.in_features], "num_deltas": m.num_deltas,
                        "index_dtype": str(idx_dtype).removeprefix("torch.")}
        if base_fingerprints and name in base_fingerprints:
            layers[name]["fingerprint"] = base_fingerprints[name]
        elif not _is_4bit(m):
            layers[name]["fingerprint"] = module_fingerprint(m)
    return tensors, layers


def detect_method(model: nn.Module) -> str:
    """The adapter method a prepared model carries ("spiel", "s2ft", "lora"), or raise."""
    tagged = getattr(model, "spft_method", None)
    if tagged:
        return tagged
    from spft.nn import sparse_delta_modules

    if sparse_delta_modules(model):
        return "spiel"
    if hasattr(model, "peft_config"):
        return "lora"
    raise AdapterError("cannot tell which adapter method this model carries; pass method=")


def save_adapter(model: nn.Module, path: str | os.PathLike, *, method: str | None = None,
                 base_fingerprints: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Save the trainable state of a spft-prepared `model` as an adapter file at `path`.

    method: "spiel-ag" / "spiel-ma" / "spiel" (SparseDeltaLinear layers), "s2ft", "full" (every
        trainable parameter) or "lora" (peft); detected from the model when None.
    base_fingerprints: for "full", fingerprints of the target weights *before* training (the
        trainer records them), since the trained weights no longer describe the base.
    Returns the metadata written.
    """
    method = method or detect_method(model)
    extra = dict(extra or {})
    if method in SPIEL_METHODS:
        tensors, layers = _spiel_payload(model, base_fingerprints)
        if not tensors:
            raise AdapterError("the model has no SparseDeltaLinear layer to save")
    elif method == "s2ft":
        from spft.adapters.s2ft import s2ft_payload
        tensors, layers, s2_extra = s2ft_payload(model)
        extra.update(s2_extra)
    elif method in ("full", "lora"):
        tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if not tensors:
            raise AdapterError("the model has no trainable parameter to save")
        layers = {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                  for n, t in tensors.items()}
        if method == "lora":
            extra.setdefault("peft_config", {k: str(v) for k, v in
                                             getattr(model, "peft_config", {}).items()})
    else:
        raise AdapterError(f"unknown adapter method {method!r}")
    if base_fingerprints:
        for n, lay in layers.items():
            if n in base_fingerprints:
                lay["fingerprint"] = base_fingerprints[n]
    fps = {n: lay["fingerprint"] for n, lay in layers.items() if lay.get("fingerprint")}
    if method == "full" and base_fingerprints:
        fps = dict(base_fingerprints)
    metadata = {
        "format": FORMAT, "spft_version": _version(), "method": method,
        "layers": json.dumps(layers), "fingerprint": combine(fps) if fps else "",
        "base_fingerprints": json.dumps(fps), "extra": json.dumps(extra, default=str),
    }
    atomic_save_safetensors(tensors, path, metadata)
    return metadata


# --------------------------------------------------------------------------- reading
def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, parsed metadata) of an adapter file; AdapterError if it is missing, truncated,
    corrupt, not a spft adapter, or its tensors disagree with its metadata."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterError(f"adapter file not found: {path}")
    try:
        tensors = {}
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[key] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises several types for damaged files
        raise AdapterError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                           f"{e}") from None
    if raw.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a spft adapter (format={raw.get('format')!r})")
    try:
        meta: dict[str, Any] = dict(raw)
        for key in ("layers", "base_fingerprints", "extra"):
            meta[key] = json.loads(raw.get(key) or "{}")
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: corrupt adapter metadata ({e.msg})") from None
    if meta["method"] in SPIEL_METHODS:
        for name, lay in meta["layers"].items():
            idx, dv = tensors.get(f"{name}.idx"), tensors.get(f"{name}.dv")
            if idx is None or dv is None:
                raise AdapterError(f"{path}: layer {name!r} lacks its idx or dv tensor")
            k = lay["num_deltas"]
            if idx.shape != (k,) or dv.shape != (k,):
                raise AdapterError(f"{path}: layer {name!r} holds {tuple(idx.shape)} indices and "
                                   f"{tuple(dv.shape)} values, metadata says {k}")
            numel = lay["shape"][0] * lay["shape"][1]
            if k and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise AdapterError(f"{path}: layer {name!r} has indices outside [0, {numel})")
    return tensors, meta


def _check_fingerprint(name: str, module: nn.Module, expected: str | None, path: str,
                       shape: list[int] | None) -> None:
    have = [getattr(module, "out_features", None), getattr(module, "in_features", None)]
    if shape is not None and None not in have and have != list(shape):
        raise AdapterError(f"{path}: adapter was made for a base whose {name} has shape "
                           f"{tuple(shape)}, this model's is {tuple(have)}: wrong base model")
    if _is_4bit(module):
        return  # a 4-bit base cannot reproduce the 16-bit fingerprint; shapes were checked
    if expected and module_fingerprint(module) != expected:
        raise AdapterError(f"{path}: the base weights of {name} differ from those the adapter "
                           "was trained on (fingerprint mismatch): wrong base model. Load the "
                           "base model the adapter was made for.")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True,
                 merged: bool = False) -> nn.Module:
    """Apply the adapter at `path` to `model` (a base model, or one already prepared with the
    same method) and return it. Raises AdapterError, before changing anything, when the file is
    damaged or the model is not the base the adapter was trained on.

    merged: for SpIEL, fold the deltas into the weights in place (fast forward, exact unmerge).
    """
    path = os.fspath(path)
    tensors, meta = read_adapter(path)
    method = meta["method"]
    layers = meta["layers"]
    if method in SPIEL_METHODS:
        modules = {}
        for name, lay in layers.items():
            try:
                modules[name] = model.get_submodule(name)
            except AttributeError:
                raise AdapterError(f"{path}: the model has no module {name!r}: wrong base "
                                   "model or architecture") from None
            if check_base:
                _check_fingerprint(name, modules[name], lay.get("fingerprint"), path,
                                   lay["shape"])
        from spft.nn import SparseDeltaLinear
        for p in model.parameters():
            p.requires_grad_(False)  # the adapter's deltas are the only trainable values
        for name, module in modules.items():
            idx, dv = tensors[f"{name}.idx"], tensors[f"{name}.dv"]
            if not isinstance(module, SparseDeltaLinear):
                from spft.nn.nf4_linear import is_4bit_linear
                if not isinstance(module, nn.Linear) and not is_4bit_linear(module):
                    raise AdapterError(f"{path}: {name} is a {type(module).__name__}, "
                                       "expected nn.Linear")
                wrapped = SparseDeltaLinear(module, num_deltas=idx.numel())
                replace_submodule(model, name, wrapped)
                module = wrapped
            module.set_indices(idx.to(module.idx.device),
                               dv.to(device=module.dv.device, dtype=module.dv.dtype))
            module.dv.requires_grad_(True)
            if merged:
                module.merge()
        model.spft_method = method
        return model
    if method == "s2ft":
        from spft.adapters.s2ft import load_s2ft
        return load_s2ft(model, tensors, meta, path, check_base=check_base)
    if method in ("full", "lora"):
        params = dict(model.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise AdapterError(f"{path}: the model has no parameter {missing[0]!r} "
                               f"({len(missing)} missing): wrong base model or method not "
                               "prepared (LoRA adapters need the peft-wrapped model)")
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise AdapterError(f"{path}: {n} has shape {tuple(t.shape)} in the adapter, "
                                   f"{tuple(params[n].shape)} in the model: wrong base model")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        return model
    raise AdapterError(f"{path}: unknown adapter method {method!r}")


# --------------------------------------------------------------------------- merge / info
@torch.no_grad()
def merge_adapter(model: nn.Module, path: str | os.PathLike | None = None, *,
                  dtype: torch.dtype | None = torch.bfloat16) -> nn.Module:
    """Fold an adapter into plain `nn.Linear` weights and return the merged model.

    path: load this adapter first (else merge what the model carries). dtype: cast the merged
    model (default bf16, the 16-bit model `spft merge` writes); None keeps dtypes.
    """
    if path is not None:
        model = load_adapter(model, path)
    from spft.nn import sparse_delta_modules

    for name, m in sparse_delta_modules(model).items():
        w = m.merged_weight()
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.detach(), requires_grad=False)
        replace_submodule(model, name, linear)
    from spft.adapters.s2ft import merge_s2ft
    model = merge_s2ft(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if hasattr(model, "spft_method"):
        del model.spft_method
    if dtype is not None:
        model = model.to(dtype)
    return model


def adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of what an adapter holds: method, version, layers, counts, dtypes, sizes."""
    tensors, meta = read_adapter(path)
    trainable = sum(t.numel() for k, t in tensors.items() if not k.endswith((".idx", ".perm")))
    return {
        "path": os.fspath(path), "method": meta["method"], "spft_version": meta["spft_version"],
        "fingerprint": meta.get("fingerprint", ""), "num_layers": len(meta["layers"]),
        "trainable_values": trainable,
        "file_bytes": os.path.getsize(path),
        "index_dtypes": sorted({str(t.dtype).removeprefix("torch.") for k, t in tensors.items()
                                if k.endswith(".idx")}),
        "layers": meta["layers"], "extra": meta.get("extra", {}),
    }


def format_info(info: dict[str, Any], max_layers: int = 12) -> str:
    lines = [f"adapter      {info['path']}",
             f"method       {info['method']}  (spft {info['spft_version']})",
             f"base         fingerprint {info['fingerprint'] or '-'}",
             f"layers       {info['num_layers']}",
             f"trainable    {info['trainable_values']:,} values",
             f"file         {info['file_bytes'] / 2**20:.2f} MiB"]
    if info["index_dtypes"]:
        lines.append(f"index dtype  {', '.join(info['index_dtypes'])}")
    for i, (name, lay) in enumerate(info["layers"].items()):
        if i == max_layers:
            lines.append(f"  ... {info['num_layers'] - max_layers} more")
            break
        detail = ", ".join(f"{k}={v}" for k, v in lay.items() if k != "fingerprint")
        lines.append(f"  {name}: {detail}")
    return "\n".join(lines)
