"""Build omni_fast and its native extension omni_fast._C.

What gets built, decided here once:
  * OMNI_FAST_NO_EXT=1            -> no native code at all (everything falls back to Triton / torch).
  * a CUDA build of torch + nvcc  -> CUDAExtension: csrc/bindings.cpp + csrc/cpu/*.cpp + csrc/*.cu
                                     (the CUDA ops are compiled in with OMNI_FAST_WITH_CUDA defined).
  * otherwise (CPU torch)         -> CppExtension: csrc/bindings.cpp + csrc/cpu/*.cpp only. torch's
                                     CUDAExtension cannot build against a CPU torch; the .cu files are
                                     still compile-checked by tests/test_csrc_compile.py where nvcc exists.
Install with `pip install --no-build-isolation -e .` so the torch already installed is the one built against.
"""
import glob
import os

from setuptools import setup

# omni_fast.kernels is the top-level kernels/ folder, reached through the symbolic link omni_fast/kernels; the
# folder has no __init__.py so that it never shadows the PyPI package imported as `kernels` (kernels/README.md)
PACKAGES = ["omni_fast", "omni_fast.model", "omni_fast.media", "omni_fast.engine", "omni_fast.grpo",
            "omni_fast.kernels"]


def _native_extension():
    if os.environ.get("OMNI_FAST_NO_EXT", "0") == "1" or not os.path.exists("csrc/bindings.cpp"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx_flags = ["-O3"]  # the C++ standard is the one BuildExtension picks for the installed torch
    if with_cuda:
        arch = os.environ.get("OMNI_FAST_CUDA_ARCH", "90")
        ext = cpp_extension.CUDAExtension(
            "omni_fast._C", sources + cuda_sources, include_dirs=[os.path.abspath("csrc")],
            define_macros=[("OMNI_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "--use_fast_math",
                                         f"-gencode=arch=compute_{arch},code=sm_{arch}"]})
    else:
        ext = cpp_extension.CppExtension("omni_fast._C", sources, include_dirs=[os.path.abspath("csrc")],
                                         extra_compile_args=cxx_flags)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extension()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
