"""Build script for spft-kernels.

Python packages: `spft` (from python/spft) and `sparse_kernels` (Triton kernels).
The compiled extension `spft._C` is built from csrc/ with torch's cpp_extension:

* CUDA sources (*.cu) are compiled only when nvcc is found (CUDA_HOME) or SPFT_FORCE_CUDA=1;
  no GPU is needed to build them (set TORCH_CUDA_ARCH_LIST, default "9.0" when none is visible).
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
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if not cpp_sources:
        return [], {}
    force_cuda = os.environ.get("SPFT_FORCE_CUDA", "0") == "1"
    use_cuda = bool(cuda_sources) and (cpp_extension.CUDA_HOME is not None or force_cuda)
    cxx_flags = ["-O3", "-std=c++17"]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = cpp_extension.CUDAExtension(
            name="spft._C",
            sources=cpp_sources + cuda_sources,
            define_macros=[("SPFT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            name="spft._C", sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[*find_packages(where="python"), "sparse_kernels"],
    package_dir={"": "python", "sparse_kernels": "sparse_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
