"""Plain `pip install -e .` installs the pure-Python package (the CUDA backend then JIT-builds on first use).

`KVKERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation` builds the CUDA extension ahead of time
(needs torch, nvcc and ninja in the build environment).
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("KVKERNELS_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    sources = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith((".cu", ".cpp")))
    ext_modules = [CUDAExtension("kvkernels._C", sources,
                                 extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
