"""Build clipfast: the Python package, `clipfast.triton_kernels`, and the native extension `clipfast._C`.

The extension always carries the C++ CPU kernels (csrc/cpu). When torch is a CUDA build and nvcc is
found, the CUDA kernels (csrc/cuda) are built into the same library, whether or not a GPU is present:
the architectures come from CLIPFAST_CUDA_ARCHS (default "8.0;9.0") because none can be queried.
CLIPFAST_BUILD_NATIVE=0 skips native code entirely (the package then runs its reference kernels on the
CPU and Triton on the GPU). DEBUG=1 builds with -O0 -g.

Install with `pip install --no-build-isolation -e .` so the extension is built against the torch that
will run it.
"""

import glob
import os
import shutil

from setuptools import setup

NAME = "clipfast"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    """The CUDA toolkit root, or None. /usr/local/bin/nvcc may be a wrapper script, so torch's guess from
    `which nvcc` (its parent's parent) can be wrong: prefer CUDA_HOME/CUDA_PATH, then the conventional
    /usr/local/cuda, then the directory above a real nvcc binary."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _extensions():
    if os.environ.get("CLIPFAST_BUILD_NATIVE", "1") == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    sources = ["csrc/clipfast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = opt + ["-fopenmp", "-std=c++20"]
    cuda_home = _cuda_home() if torch.version.cuda else None
    if cuda_home is None:
        ext = cpp_extension.CppExtension(
            f"{NAME}._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    else:
        cpp_extension.CUDA_HOME = cuda_home
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("CLIPFAST_CUDA_ARCHS", "8.0;9.0"))
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = cpp_extension.CUDAExtension(
            f"{NAME}._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": opt[:1] + ["-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name=NAME,
    version="0.1.0",
    description="Fused kernels for CLIP-style vision-language models: contrastive losses and more.",
    packages=["clipfast", "clipfast.reference", "clipfast.ops", "clipfast.nn", "clipfast.bench", "clipfast.integrations",
              "clipfast.triton_kernels"],
    package_dir={"clipfast.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "open_clip": ["open-clip-torch>=3.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
