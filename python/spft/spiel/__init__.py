"""spft.spiel — SpIEL training dynamics: drop-and-grow over `SparseDeltaLinear` layers.

`SpIELController(model, optimizer, method="ag"|"ma", total_steps=...)`; call `.step()` after
each `optimizer.step()`.
"""

from spft.ops.spiel_ag import CandidateTracker
from spft.spiel.controller import SpIELController

__all__ = ["CandidateTracker", "SpIELController"]
