"""`S2Linear`: an nn.Linear whose first s output rows or input columns are trainable (S2FT).

Build it from a linear *after* co-permutation (`spft.s2ft.permute`), so the trainable channels
are the first s along `axis`:

    layer = S2Linear.from_linear(linear, s=64, axis="input", index=orig_cols)  # [out, in] weight

Layout: the module keeps the whole permuted weight as one frozen buffer ``weight`` [out, in];
the parameter ``trainable`` ([s, in] for axis="output", [out, s] for axis="input") is a *view*
of its first s rows/columns, so the optimizer updates the weight in place and `spft.ops.s2_linear`
sees the two parts lying next to each other (one GEMM over the whole weight, no copy). If the
tie is ever broken (e.g. a `.to()` that copies), ``_apply`` re-ties it; a broken tie is still
correct (the split GEMM reads both parts separately), only slower.

``base_block`` keeps the block's initial values (for `delta()`, i.e. adapter export);
``index`` [s] int64 holds the block's channels in the original (un-permuted) coordinates.
Gradient accumulation (several backward passes before a step) and activation checkpointing work
like any autograd module: gradients accumulate into ``trainable.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spft.ops.s2 import AXES, s2_linear


class S2Linear(nn.Module):
    """y = x @ Wᵀ + b with W [out, in]; only W[:s] (axis="output") or W[:, :s] (axis="input")
    is trainable. Dtypes: the weight's (bf16/fp16/fp32)."""

    def __init__(self, weight: Tensor, s: int, axis: str = "input", bias: Tensor | None = None,
                 index: Tensor | None = None) -> None:
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        size = weight.shape[0] if axis == "output" else weight.shape[1]
        if not isinstance(s, int) or not 0 <= s <= size:
            raise ValueError(f"s must be an int in [0, {size}] for axis={axis!r}, got {s!r}")
        if index is None:
            index = torch.arange(s)
        index = torch.as_tensor(index, dtype=torch.int64, device=weight.device)
        if index.shape != (s,):
            raise ValueError(f"index must have shape ({s},), got {tuple(index.shape)}")
        self.axis = axis
        self.s = s
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().contiguous())
        self.trainable = nn.Parameter(self._block_view())
        self.register_buffer("base_block", self._block_view().clone())
        self.register_buffer("index", index)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, s: int, axis: str = "input",
                    index: Tensor | None = None) -> S2Linear:
        """Wrap an (already co-permuted) nn.Linear; its weight storage is reused, not copied."""
        return cls(linear.weight.data, s, axis, linear.bias.data if linear.bias is not None
                   else None, index)

    def _block_view(self) -> Tensor:
        return self.weight[: self.s] if self.axis == "output" else self.weight[:, : self.s]

    def frozen(self) -> Tensor:
        """The frozen remainder as a view of ``weight``."""
        return self.weight[self.s:] if self.axis == "output" else self.weight[:, self.s:]

    def _retie(self) -> None:
        view = self._block_view()
        if self.trainable.data.data_ptr() != view.data_ptr() or \
                self.trainable.stride() != view.stride():
            with torch.no_grad():
                view.copy_(self.trainable.data)
            self.trainable.data = view

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._retie()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._retie()

    def forward(self, x: Tensor) -> Tensor:
        return s2_linear(x, self.trainable, self.frozen(), self.axis, self.bias)

    @torch.no_grad()
    def delta(self) -> Tensor:
        """trainable − base_block in fp32 (fp64 stays fp64): [s, in] or [out, s]."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return self.trainable.detach().to(acc) - self.base_block.to(acc)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the current (permuted-coordinate) weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.weight)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"s={self.s}, axis={self.axis!r}, bias={self.bias is not None}")
