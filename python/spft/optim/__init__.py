"""spft.optim — optimizers for sparse fine-tuning.

* `SM3` — sparse (row/column accumulators) and dense (SM3-II) tensors; fused multi-tensor step.
* `AdamW` (= `SparseAdamW`) — per-index step counts, optional bf16 state; fused step.

Both take `modules=` (a model or its `spft.nn.SparseDeltaLinear` layers) to know which params
are sparse deltas; both round-trip `state_dict()` exactly and expose `remap_sparse_state` for
the SpIEL controller (`spft.spiel`).
"""

from spft.optim.adamw import AdamW, SparseAdamW
from spft.optim.sm3 import SM3

__all__ = ["SM3", "AdamW", "SparseAdamW"]
