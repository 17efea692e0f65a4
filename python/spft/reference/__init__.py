"""Plain-torch reference implementations: the test oracle, the CPU path and the benchmark baseline.

Readable over fast; they upcast to fp32 (or fp64 when given fp64) and never call Triton.
"""
