"""Build ntkfast and its compiled extension ntkfast._C.

CppExtension always; CUDAExtension when PyTorch has CUDA and a toolkit is found, or FORCE_CUDA=1.
FORCE_CPU=1 skips CUDA. NTKFAST_EXTRA_CFLAGS and NTKFAST_EXTRA_LDFLAGS (split as a shell would) are
appended to the C++ compile and link flags (.ci/sanitize_cpu.sh passes -fsanitize=... through them).
Build with `pip install --no-build-isolation -e .` so the installed torch is the one compiled against.
"""
import glob
import os
import shlex
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_checks import choose_cxx  # noqa: E402

try:
    import torch
except ImportError:  # with --no-build-isolation the build uses the installed torch, so it must be there
    sys.exit("ntkfast: building needs PyTorch installed first (pip install torch), then "
             "`pip install --no-build-isolation -e .`")
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = open(os.path.join(ROOT, "ntkfast", "_version.py")).read().split('"')[1]


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to it")
        if torch.version.cuda is None:
            raise RuntimeError(f"FORCE_CUDA=1 needs a CUDA build of PyTorch; torch {torch.__version__} has no CUDA "
                               "(the CUDA sources still compile without one: bash .ci/cuda_compile_check.sh)")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _openmp_flags():
    if sys.platform == "darwin":
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _pick_compiler():
    # the compile (ninja, $CXX) and the link (setuptools, $CXX) both follow CXX, so one setting covers both
    cxx = choose_cxx()
    if cxx is not None and cxx != os.environ.get("CXX"):
        os.environ["CXX"] = cxx
        cc = os.path.join(os.path.dirname(cxx), "gcc") if os.path.basename(cxx) in ("g++", "c++") else None
        if cc and os.path.exists(cc) and os.environ.get("CC"):
            os.environ["CC"] = cc


def make_extension():
    if not any(a in sys.argv for a in ("--help", "-h", "egg_info", "sdist", "dist_info", "--version")):
        _pick_compiler()
    with_cuda = _want_cuda()
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    omp_c, omp_l = _openmp_flags()
    # last, so that they win over the defaults (-O1 after -O3)
    extra_c = shlex.split(os.environ.get("NTKFAST_EXTRA_CFLAGS", ""))
    extra_l = shlex.split(os.environ.get("NTKFAST_EXTRA_LDFLAGS", ""))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    define_macros = [
        ("NTKFAST_VERSION", f'"{VERSION}"'),
        ("NTKFAST_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    cxx = ["-O3", "-std=c++17"] + omp_c + extra_c
    if with_cuda:
        define_macros += [("NTKFAST_WITH_CUDA", "1"), ("NTKFAST_CUDA_ARCHS", f'"{archs or "default"}"')]
        return CUDAExtension(
            "ntkfast._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=omp_l + extra_l,
        )
    return CppExtension(
        "ntkfast._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=omp_l + extra_l,
    )


# Name, version, dependencies, the console script and package data are in pyproject.toml's [project]
# table; only the extension, whose sources depend on the machine, is declared here.
setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
