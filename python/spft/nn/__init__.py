"""spft.nn — modules built on `spft.ops`."""

from spft.nn.nf4_linear import NF4Linear, quantize_model_nf4
from spft.nn.s2_linear import S2Linear
from spft.nn.sparse_delta_linear import (
    DEFAULT_TARGET_MODULES,
    SparseDeltaLinear,
    apply_sparse_deltas,
    refresh_merged_weights,
    sample_unique_indices,
    sparse_delta_modules,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "NF4Linear",
    "S2Linear",
    "SparseDeltaLinear",
    "apply_sparse_deltas",
    "quantize_model_nf4",
    "refresh_merged_weights",
    "sample_unique_indices",
    "sparse_delta_modules",
]
