"""Only for the optional ahead-of-time native build: `FASTLORA_BUILD_EXT=1 pip install .`.

Without FASTLORA_BUILD_EXT the package is pure Python (metadata in pyproject.toml) and the native extension is
built just in time, with ninja, on first use (fastlora/_native.py).
"""

import os
from pathlib import Path

from setuptools import setup

# The same flags as the just-in-time build (fastlora/_native.py says why), without -march=native: a wheel runs
# on other machines.
CXX_FLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]


def native_extensions():
    if os.environ.get("FASTLORA_BUILD_EXT") != "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    root = Path(__file__).parent / "csrc"
    sources = [str(p.relative_to(Path(__file__).parent)) for p in sorted(root.glob("cpu/*.cpp"))]
    sources.append("csrc/module.cpp")
    cuda = sorted(root.glob("cuda/*.cu"))
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and cuda:
        sources += [str(p.relative_to(Path(__file__).parent)) for p in cuda]
        flags = {"cxx": CXX_FLAGS, "nvcc": ["-O3"]}
        ext = cpp_extension.CUDAExtension("fastlora._C", sources, extra_compile_args=flags)
    else:
        ext = cpp_extension.CppExtension("fastlora._C", sources, extra_compile_args={"cxx": CXX_FLAGS})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
