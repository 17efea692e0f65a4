"""spft.nn — modules built on `spft.ops`."""

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
    "S2Linear",
    "SparseDeltaLinear",
    "apply_sparse_deltas",
    "refresh_merged_weights",
    "sample_unique_indices",
    "sparse_delta_modules",
]
