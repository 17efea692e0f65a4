"""spft.ops — the public functional ops (torch.library custom ops with autograd).

Importing this registers the ops under `torch.ops.spft`; it never initialises CUDA or imports
Triton (kernels load on the first CUDA call).
"""

from spft.ops.nf4 import (
    NF4Weight,
    nf4_dequantize,
    nf4_dequantize_scatter,
    nf4_linear_small_batch,
    nf4_quantize,
    nf4_row_pointers,
    sparse_delta_linear_nf4,
)
from spft.ops.nf4_gemv import NF4GemvWeight, nf4_gemv_pack
from spft.ops.s2 import s2_adapter_linear, s2_linear, s2_linear_dx
from spft.ops.sparse_delta import (
    sparse_delta_grad,
    sparse_delta_linear,
    sparse_delta_materialize,
    sparse_delta_refresh_,
)

__all__ = [
    "NF4GemvWeight",
    "NF4Weight",
    "nf4_dequantize",
    "nf4_dequantize_scatter",
    "nf4_gemv_pack",
    "nf4_linear_small_batch",
    "nf4_quantize",
    "nf4_row_pointers",
    "s2_adapter_linear",
    "s2_linear",
    "s2_linear_dx",
    "sparse_delta_grad",
    "sparse_delta_linear",
    "sparse_delta_linear_nf4",
    "sparse_delta_materialize",
    "sparse_delta_refresh_",
]
