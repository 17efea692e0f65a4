"""Benchmark modules import their helpers (common.py) by plain name; the GPU skip lives in the
repository-root conftest.py."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
