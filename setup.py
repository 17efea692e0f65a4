"""Build script for spft-kernels.

Python packages: `spft` (from python/spft) and `sparse_kernels` (Triton kernels).
The compiled extension `spft._C` is built from csrc/ with torch's cpp_extension:

* Its kernels are CUDA only, so it is built only when nvcc is found (CUDA_HOME) or
  SPFT_FORCE_CUDA=1; no GPU is needed to build it (TORCH_CUDA_ARCH_LIST, default "9.0").
  A CPU-only install (CI) skips it and serves every op from Triton or the torch references.
* SPFT_SKIP_EXTENSION=1 skips the extension entirely; so does a missing torch at build time.
Nothing imports spft._C eagerly: the package works without it.
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("SPFT_SKIP_EXTENSION", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    force_cuda = os.environ.get("SPFT_FORCE_CUDA", "0") == "1"
    if not cpp_sources or not cuda_sources:
        return [], {}
    if not force_cuda and (cpp_extension.CUDA_HOME is None or torch.version.cuda is None):
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    ext = cpp_extension.CUDAExtension(
        name="spft._C",
        sources=cpp_sources + cuda_sources,
        define_macros=[("SPFT_WITH_CUDA", "1")],
        # No -std here: torch adds the standard its own headers were built with (C++20 for
        # torch 2.11+); compiling them as C++17 breaks exceptions thrown across the boundary.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=[*find_packages(where="python"), "sparse_kernels"],
    package_dir={"": "python", "sparse_kernels": "sparse_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
