"""Build script: the pure Python package plus, when possible, the native extension aepg_kernels._C
(csrc/: CPU kernels everywhere, CUDA kernels when torch has CUDA and nvcc is found, or
AEPG_FORCE_CUDA=1). The extension is optional: without torch in the build environment (build
isolation: use `pip install --no-build-isolation .`), without a compiler, or when its build fails,
the package still installs and `aepg_kernels.available_backends()` says what is usable.

Environment: AEPG_NO_NATIVE=1 skips the extension, AEPG_NO_CUDA=1 / AEPG_FORCE_CUDA=1 decide on
the CUDA sources, TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "9.0").
"""

import os
import platform
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# Flags of the per-instruction-set CPU kernel builds (csrc/sources.txt groups); each file defines
# its CPU_CAPABILITY itself, and the dispatcher is told which builds exist.
ISA_GROUPS = {
    "cpu_avx2": (["-mavx2", "-mfma", "-mf16c"], "-DAEPG_CPU_AVX2"),
    "cpu_avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"], "-DAEPG_CPU_AVX512"),
}


def read_sources():
    """{group: [paths]} from csrc/sources.txt, the list CMakeLists.txt reads too."""
    groups = {}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            group, path = line.split()
            groups.setdefault(group, []).append(path)
    return groups


def _warn(message):
    warnings.warn(f"aepg_kernels: {message}; installing the pure Python package (backends triton/eager)", stacklevel=2)
    print(f"WARNING: aepg_kernels: {message}")


def native_build():
    """(ext_modules, cmdclass) for the native extension, or ([], {}) when it cannot be built."""
    if os.environ.get("AEPG_NO_NATIVE", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn(
            "torch is not importable in the build environment (pip install --no-build-isolation . builds "
            "the native kernels against the installed torch)"
        )
        return [], {}

    groups = read_sources()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    isa_builds = {group: groups[group] for group in ISA_GROUPS if x86 and groups.get(group)}
    want_cuda = os.environ.get("AEPG_FORCE_CUDA", "0") == "1" or (
        torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )
    if os.environ.get("AEPG_NO_CUDA", "0") == "1" or not groups.get("cuda"):
        want_cuda = False

    def make_extension(with_cuda):
        cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]  # torch adds the C++ standard it needs
        cxx += [ISA_GROUPS[group][1] for group in isa_builds]
        sources = list(groups["cpu"])
        make = cpp_extension.CppExtension
        if with_cuda:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
            sources += groups["cuda"]
            cxx.append("-DAEPG_WITH_CUDA")
            make = cpp_extension.CUDAExtension
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-DAEPG_WITH_CUDA"]
        ext = make(
            "aepg_kernels._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
        ext.aepg_with_cuda = with_cuda
        return ext

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Compiles the AVX2 / AVX-512 kernels with their own flags; a failed CUDA build falls back to the CPU
        kernels alone, and a failed CPU build to the pure package: the install never fails."""

        def run(self):
            inplace = self.inplace  # setuptools clears it during run() and restores it only on success
            try:
                super().run()
                return
            except Exception as error:  # compiler missing, compile or link error
                failure = f"{type(error).__name__}: {error}"
            if not any(getattr(ext, "aepg_with_cuda", False) for ext in self.extensions):
                _warn(f"the native extension failed to build ({failure})")
                return
            print(f"WARNING: aepg_kernels: the CUDA kernels failed to build ({failure}); building the CPU kernels")
            cpu_only = make_extension(with_cuda=False)
            for name, value in vars(self.extensions[0]).items():  # what finalize_options added (_needs_stub, ...)
                if name.startswith("_") and not hasattr(cpu_only, name):
                    setattr(cpu_only, name, value)
            self.extensions = [cpu_only]
            self.compiler = None  # run() makes a fresh compiler from a name, not from the previous object
            self.inplace = inplace
            try:
                super().run()
            except Exception as error:
                _warn(f"the native extension failed to build ({type(error).__name__}: {error})")

        def build_extension(self, ext):
            for group, sources in isa_builds.items():
                flags = dict(ext.extra_compile_args)
                flags["cxx"] = flags["cxx"] + ISA_GROUPS[group][0]
                ext.extra_objects = list(ext.extra_objects) + self.compiler.compile(
                    sources,
                    output_dir=self.build_temp,
                    include_dirs=ext.include_dirs,
                    extra_postargs=flags,
                    depends=ext.depends,
                )
            super().build_extension(ext)

    return [make_extension(want_cuda)], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
