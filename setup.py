"""Builds one C++ extension module per op in csrc/cpu (symfast._cpu_<op>).

Each module registers its kernels as torch ops in the ``symfast`` namespace. If the build is
skipped or fails, symfast compiles the same sources on first use (symfast/_ext.py).
The modules are compiled in parallel, one per core (MAX_JOBS caps it, as it caps torch's ninja).
"""
import glob
import os
import runpy
import threading

from setuptools import find_packages, setup

# The op list and flags, shared with the compile on first use; read without importing symfast.
BUILD = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "symfast", "_build.py"))


def _extensions():
    if os.environ.get("SYMFAST_NO_BUILD") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob("csrc/cpu/*.cpp")}
    if sources != set(BUILD["CPU_OPS"]):
        raise RuntimeError(f"csrc/cpu holds {sorted(sources)} but symfast/_build.py lists "
                           f"{sorted(BUILD['CPU_OPS'])}: keep the two in step")
    exts = [
        CppExtension(
            name=f"symfast._cpu_{op}",
            sources=[f"csrc/cpu/{op}.cpp"],
            include_dirs=[os.path.abspath("csrc/cpu")],
            extra_compile_args=BUILD["compile_flags"](),
            extra_link_args=BUILD["link_flags"](),
        )
        # largest source first: with one module per core, the longest compile starts at once
        for op in sorted(BUILD["CPU_OPS"], key=lambda op: -os.path.getsize(f"csrc/cpu/{op}.cpp"))
    ]
    return exts, {"build_ext": _parallel_build(BuildExtension)}


def _parallel_build(base):
    """torch's BuildExtension with the extensions compiled concurrently (setuptools' ``parallel``
    thread pool). torch's ninja compile writes build.ninja into the build folder it is given, the
    same folder for every extension, so each source gets its own subfolder instead."""

    class ParallelBuildExtension(base):
        _lock = threading.Lock()

        def __init__(self, *args, **kwargs):
            super().__init__(*args, use_ninja=True, **kwargs)

        def finalize_options(self):
            super().finalize_options()
            if not self.parallel:
                self.parallel = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)

        def build_extension(self, ext):
            with self._lock:  # the compile function torch installed, wrapped once
                compile_ = self.compiler.compile
                if not getattr(compile_, "one_folder_per_source", False):
                    def compile_in_own_folder(sources, output_dir=None, *args, **kwargs):
                        own = os.path.join(output_dir, os.path.splitext(os.path.basename(sources[0]))[0])
                        return compile_(sources, own, *args, **kwargs)
                    compile_in_own_folder.one_folder_per_source = True
                    self.compiler.compile = compile_in_own_folder
            super().build_extension(ext)

    return ParallelBuildExtension


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["symfast", "symfast.*"]) + ["symfast.kernels"],
    package_dir={"symfast.kernels": "kernels"},
    # the shipped digit classifier (FD features) and the demo checkpoint
    package_data={"symfast": ["assets/*.json", "assets/*.safetensors", "assets/*/*.json",
                              "assets/*/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
