"""Build clipfast: the Python package, `clipfast.triton_kernels`, and the native extension `clipfast._C`.

The extension always carries the C++ CPU kernels (csrc/cpu). When torch is a CUDA build and a CUDA
toolkit is found, the CUDA kernels (csrc/cuda) are built into the same library, whether or not a GPU is
present: the architectures come from CLIPFAST_CUDA_ARCHS (default "8.0;9.0") because none can be
queried. The CPU kernels' vector loops (csrc/cpu/vec/*.cpp) are compiled once per instruction-set level
(x86-64: AVX512, AVX2, DEFAULT; aarch64: DEFAULT = NEON) as ATen compiles its own, and chosen at run time
(csrc/include/clipfast/cpu_kernels.h). Environment:

- CLIPFAST_BUILD_NATIVE=0: no native code at all (the pure-PyTorch package: reference kernels on the
  CPU, Triton on the GPU). The only choice on a machine without a C++ compiler.
- CLIPFAST_BUILD_CUDA=auto (default): the CUDA kernels when torch is a CUDA build and the toolkit is
  found; a CUDA torch with no toolkit builds without them and says so loudly. =1: the CUDA kernels or
  an error (the GPU check uses this). =0: never.
- CUDA_HOME / CUDA_PATH: the toolkit root, when it is not found on its own (searched: those two, the
  conventional /usr/local/cuda, the directory above a real nvcc on PATH, the toolkit of pip's
  nvidia-cuda-nvcc wheels).
- MAX_JOBS: parallel compile jobs (ninja's default: all cores + 2). DEBUG=1: -O0 -g.

Install with `pip install --no-build-isolation .` (or `-e .`) so the extension is built against the
torch that will run it; add `-v` to watch the compile progress.
"""

import concurrent.futures
import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys

from setuptools import setup

NAME = "clipfast"
VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
# Tested from the oldest to the pinned development versions (see the README, "Supported versions").
TORCH_REQUIREMENT = "torch>=2.11"
TRITON_REQUIREMENT = "triton>=3.6"


def _say(message: str) -> None:
    print(f"clipfast setup: {message}", file=sys.stderr, flush=True)


def _loud(lines) -> None:
    bar = "!" * 100
    print("\n".join([bar] + [f"!! {line}" for line in lines] + [bar]), file=sys.stderr, flush=True)


def _nvcc_home(nvcc: str):
    """The toolkit root above a real nvcc binary (not a wrapper script elsewhere)."""
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    return home if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) else None


def _cuda_home():
    """(toolkit root or None, the places searched). /usr/local/bin/nvcc may be a wrapper script, so
    torch's guess from `which nvcc` (its parent's parent) can be wrong."""
    searched = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        searched.append(f"{var}={value or '(unset)'}")
        if value and os.path.exists(os.path.join(value, "bin", "nvcc")):
            return value, searched
    searched.append("/usr/local/cuda")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda", searched
    nvcc = shutil.which("nvcc")
    searched.append(f"nvcc on PATH ({nvcc or 'none'})")
    if nvcc and _nvcc_home(nvcc):
        return _nvcc_home(nvcc), searched
    try:  # pip's toolkit wheels (nvidia-cuda-nvcc etc.) put a whole toolkit under nvidia/cu<major>
        import nvidia

        for base in nvidia.__path__:
            for home in sorted(glob.glob(os.path.join(base, "cu*"))):
                if os.path.exists(os.path.join(home, "bin", "nvcc")):
                    return home, searched
    except ImportError:
        pass
    searched.append("pip's nvidia toolkit wheels")
    return None, searched


def _want_cuda(torch):
    """The toolkit root when the CUDA kernels are to be built, else None (after saying why)."""
    mode = os.environ.get("CLIPFAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"CLIPFAST_BUILD_CUDA={mode!r}: use auto, 0 or 1")
    if mode == "0":
        _say("CLIPFAST_BUILD_CUDA=0: building the CPU kernels only")
        return None
    if not torch.version.cuda:
        message = f"torch {torch.__version__} is a CPU build, so the CUDA kernels cannot be built against it"
        if mode == "1":
            raise SystemExit(f"clipfast setup: CLIPFAST_BUILD_CUDA=1 but {message}.")
        _say(f"{message}; building the CPU kernels only")
        return None
    cuda_home, searched = _cuda_home()
    if cuda_home is None:
        lines = [f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, "
                 f"but no CUDA toolkit (nvcc) was found.",
                 f"Searched: {', '.join(searched)}.",
                 "Set CUDA_HOME to the toolkit root to build the CUDA kernels."]
        if mode == "1":
            _loud(lines + ["CLIPFAST_BUILD_CUDA=1: stopping."])
            raise SystemExit("clipfast setup: CUDA kernels requested (CLIPFAST_BUILD_CUDA=1) but no CUDA toolkit found")
        _loud(lines + ["Building WITHOUT the CUDA kernels (the Triton kernels still run on the GPU);",
                       "CLIPFAST_BUILD_CUDA=0 says this is intended and silences this message."])
        return None
    return cuda_home


# The per-level kernel files (csrc/cpu/vec/*.cpp) are compiled once per instruction-set level, as ATen
# compiles its own CPU kernels (its -DCPU_CAPABILITY=... flags and -m options per level), and
# csrc/cpu/dispatch.cpp picks one at run time. See csrc/include/clipfast/cpu_kernels.h.
def _cpu_levels():
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return [("DEFAULT", []), ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
                ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"])]
    return [("DEFAULT", [])]  # aarch64: NEON is the baseline, and at::vec uses it there


def _level_objects(cpp_extension, torch, build_temp, opt, jobs):
    """Compile every csrc/cpu/vec/*.cpp once per level into build_temp; returns the objects. Objects newer
    than their sources, the headers and the flags are kept (the build stays incremental)."""
    cxx = os.environ.get("CXX", "c++").split()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "vec", "*.cpp")))
    headers = glob.glob(os.path.join(ROOT, "csrc", "include", "clipfast", "*.h"))
    includes = [f"-I{d}" for d in [os.path.join(ROOT, "csrc", "include")] + cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    out_dir = os.path.join(build_temp, "cpu_levels")
    os.makedirs(out_dir, exist_ok=True)
    commands = []
    for level, flags in _cpu_levels():
        for source in sources:
            obj = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(source))[0]}.{level}.o")
            cmd = cxx + opt + ["-std=c++20", "-fPIC", abi, f"-DCPU_CAPABILITY={level}", f"-DCPU_CAPABILITY_{level}"]
            cmd += flags + includes + ["-c", source, "-o", obj]
            commands.append((obj, cmd, [source] + headers))

    def compile_one(item):
        obj, cmd, inputs = item
        stamp = obj + ".cmd"
        line = shlex.join(cmd)
        fresh = (os.path.exists(obj) and os.path.exists(stamp) and open(stamp).read() == line
                 and all(os.path.getmtime(obj) >= os.path.getmtime(i) for i in inputs))
        if not fresh:
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"clipfast setup: compiling {os.path.basename(obj)} failed:\n{line}\n"
                                 f"{result.stdout}{result.stderr}")
            with open(stamp, "w") as f:
                f.write(line)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, commands))


def _extensions():
    if os.environ.get("CLIPFAST_BUILD_NATIVE", "1") == "0":
        _say("CLIPFAST_BUILD_NATIVE=0: no native library (pure-PyTorch package)")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    sources = ["csrc/clipfast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = opt + ["-fopenmp", "-std=c++20"] + [f"-DCLIPFAST_CPU_{level}" for level, _ in _cpu_levels()]
    cuda_home = _want_cuda(torch)
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

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder, plus a compiler check that names the pure-PyTorch build and a progress line."""

        def build_extensions(self):
            cxx_compiler = os.environ.get("CXX", "c++").split()[0]
            if shutil.which(cxx_compiler) is None:
                _loud([f"No C++ compiler found ({cxx_compiler!r} is not on PATH; set CXX to choose one).",
                       "clipfast's native kernels need one (e.g. g++). Without it, install the pure-PyTorch",
                       "package (reference kernels on the CPU, Triton kernels on the GPU):",
                       "    CLIPFAST_BUILD_NATIVE=0 pip install ."])
                raise SystemExit("clipfast setup: no C++ compiler; see above for CLIPFAST_BUILD_NATIVE=0")
            for extension in self.extensions:
                cuda = [s for s in extension.sources if s.endswith(".cu")]
                jobs = os.environ.get("MAX_JOBS", f"ninja's default ({os.cpu_count()} cores + 2)")
                what = (f"{len(extension.sources) - len(cuda)} C++ and {len(cuda)} CUDA sources for "
                        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')} with CUDA_HOME={cuda_home}"
                        if cuda else f"{len(extension.sources)} C++ sources (CPU kernels only)")
                _say(f"compiling {extension.name}: {what}; {jobs} parallel jobs; "
                     f"this takes a few minutes on a few cores")
            jobs = int(os.environ.get("MAX_JOBS", (os.cpu_count() or 1) + 2))
            objects = _level_objects(cpp_extension, torch, self.build_temp, opt, jobs)
            _say(f"per-level CPU kernels: {', '.join(level for level, _ in _cpu_levels())} "
                 f"({len(objects)} objects)")
            for extension in self.extensions:
                extension.extra_objects = list(extension.extra_objects or []) + objects
            super().build_extensions()

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name=NAME,
    version=VERSION,
    description="Fused kernels for CLIP-style vision-language models: contrastive losses, "
                "Schur-complement entropy, token medoids and attentive token removal.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    author="The clipfast developers",
    license="Apache-2.0",
    license_files=["LICENSE"],
    keywords=["clip", "siglip", "contrastive loss", "pytorch", "triton", "cuda", "kernels"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
    packages=["clipfast", "clipfast.reference", "clipfast.ops", "clipfast.nn", "clipfast.bench",
              "clipfast.integrations", "clipfast.testing", "clipfast.triton_kernels"],
    package_dir={"clipfast.triton_kernels": "triton_kernels"},
    package_data={"clipfast": ["py.typed"]},
    zip_safe=False,
    python_requires=">=3.11",
    install_requires=[TORCH_REQUIREMENT, "numpy"],
    extras_require={"triton": [TRITON_REQUIREMENT], "open_clip": ["open-clip-torch>=3.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
