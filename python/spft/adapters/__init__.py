"""spft.adapters — save, load, merge and inspect adapter files (safetensors + metadata)."""

from spft.adapters.io import (
    FORMAT,
    AdapterError,
    adapter_info,
    format_info,
    load_adapter,
    merge_adapter,
    read_adapter,
    save_adapter,
)

__all__ = [
    "FORMAT",
    "AdapterError",
    "adapter_info",
    "format_info",
    "load_adapter",
    "merge_adapter",
    "read_adapter",
    "save_adapter",
]
