"""Triton kernels for spft: pure functions on tensors (no autograd, no nn, no global state).

Each module holds the `@triton.jit` kernels of one op family and their host launchers. Launchers
validate shapes, dtypes and devices, pick launch parameters and return tensors. The public,
autograd-aware surface is `spft.ops`; call these directly only in tests and benchmarks.
"""
