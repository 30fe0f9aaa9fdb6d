"""How the C++ CPU kernels are built: the op list and compiler flags, written once.

Read by setup.py (with runpy, before symfast or torch can be imported) and by symfast/_ext.py
(the compile on first use), so the two builds cannot drift apart. Imports nothing but os.
"""
import os

# One module per op, symfast._cpu_<op>, from csrc/cpu/<op>.cpp.
CPU_OPS = ("group_average", "fused_step", "tied_conv2d", "attention_pool", "classifier_select",
           "group_norm_silu")

# Portable: hot loops pick AVX2+FMA at load time by function multi-versioning (symfast_module.h).
FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]
# SYMFAST_SANITIZE=1 (csrc/sanitize.sh): AddressSanitizer + UBSan, frame pointers for stacks;
# -O1 (placed after -O3, so it wins), as the ASan documentation advises.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]


def _sanitize() -> list[str]:
    return SANITIZE_FLAGS if os.environ.get("SYMFAST_SANITIZE") == "1" else []


# SYMFAST_ISA=baseline: the baseline-ISA code only, no AVX2 clone and no AVX2 intrinsics kernel;
# SYMFAST_ISA=avx2: no AVX-512 variant (tests/test_isa_variants.py tests the variants a CPU
# without AVX2, or without AVX-512, runs on a machine that has them).
ISA_FLAGS = {"auto": [], "baseline": ["-DSYMFAST_BASELINE_ISA"], "avx2": ["-DSYMFAST_NO_AVX512"]}


def _isa() -> list[str]:
    isa = os.environ.get("SYMFAST_ISA", "auto")
    if isa not in ISA_FLAGS:
        raise ValueError(f"SYMFAST_ISA={isa!r}: expected one of {sorted(ISA_FLAGS)}")
    return ISA_FLAGS[isa]


def compile_flags() -> list[str]:
    """FLAGS, plus -march=native when SYMFAST_NATIVE=1 (a build for this CPU only), the
    baseline-only build when SYMFAST_ISA=baseline and the sanitizers when SYMFAST_SANITIZE=1."""
    native = ["-march=native"] if os.environ.get("SYMFAST_NATIVE") == "1" else []
    return FLAGS + native + _isa() + _sanitize()


def link_flags() -> list[str]:
    return ["-fopenmp"] + _sanitize()
