"""Builds one C++ extension module per op in csrc/cpu (symfast._cpu_<op>).

Each module registers its kernels as torch ops in the ``symfast`` namespace. If the build is
skipped or fails, symfast compiles the same sources on first use (symfast/_ext.py).
"""
import glob
import os

from setuptools import find_packages, setup

PORTABLE_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]


def _extensions():
    if os.environ.get("SYMFAST_NO_BUILD") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extra = ["-march=native"] if os.environ.get("SYMFAST_NATIVE") == "1" else []
    exts = []
    for src in sorted(glob.glob("csrc/cpu/*.cpp")):
        op = os.path.splitext(os.path.basename(src))[0]
        exts.append(
            CppExtension(
                name=f"symfast._cpu_{op}",
                sources=[src],
                include_dirs=[os.path.abspath("csrc/cpu")],
                extra_compile_args=PORTABLE_FLAGS + extra,
                extra_link_args=["-fopenmp"],
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
