"""S2FT (structured sparse fine-tuning): select sparsely, compute densely.

Public API (what a trainer uses), in order:

1. `select_s2ft(model, S2FTConfig(...), calibration=...)` → `S2Selection` (per block: FFN
   channels and KV-head groups, original coordinates); or `make_selection` from explicit indices.
2. `prepare_s2ft(model, selection)` → `S2FTPlan`: co-permutes each block in place (same function),
   replaces the trainable projections by `spft.nn.S2Linear` and freezes everything else. Train
   the parameters with ``requires_grad`` (the S2Linear ``trainable`` blocks).
3. `export_adapter(model)` → `S2Adapter` in original coordinates; `save_adapter`/`load_adapter`
   (safetensors); `apply_adapter`/`remove_adapter`/`switch_adapter`/`fuse_adapters` on an
   untouched base; `serve_adapters` for per-row adapters in one batch.
4. `restore_original_order(model)` turns a prepared model back into plain layers in original
   coordinates (the trained weights merged).
"""

from spft.s2ft.adapter import (
    AdapterEntry,
    S2Adapter,
    apply_adapter,
    export_adapter,
    fuse_adapters,
    load_adapter,
    remove_adapter,
    save_adapter,
    serve_adapters,
    switch_adapter,
)
from spft.s2ft.permute import (
    S2FTPlan,
    permute_block_,
    prepare_s2ft,
    restore_original_order,
    s2_modules,
)
from spft.s2ft.selection import S2FTConfig, S2Selection, make_selection, model_shape, select_s2ft

__all__ = [
    "AdapterEntry",
    "S2Adapter",
    "S2FTConfig",
    "S2FTPlan",
    "S2Selection",
    "apply_adapter",
    "export_adapter",
    "fuse_adapters",
    "load_adapter",
    "make_selection",
    "model_shape",
    "permute_block_",
    "prepare_s2ft",
    "remove_adapter",
    "restore_original_order",
    "s2_modules",
    "save_adapter",
    "select_s2ft",
    "serve_adapters",
    "switch_adapter",
]
