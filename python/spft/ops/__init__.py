"""spft.ops — the public functional ops (torch.library custom ops with autograd).

Importing this registers the ops under `torch.ops.spft`; it never initialises CUDA or imports
Triton (kernels load on the first CUDA call).
"""

from spft.ops.sparse_delta import (
    sparse_delta_grad,
    sparse_delta_linear,
    sparse_delta_materialize,
    sparse_delta_refresh_,
)

__all__ = [
    "sparse_delta_grad",
    "sparse_delta_linear",
    "sparse_delta_materialize",
    "sparse_delta_refresh_",
]
