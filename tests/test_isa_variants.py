"""Each ISA variant of the C++ kernels, tested on the machine at hand.

The default build carries two variants of every hot loop, an AVX2+FMA one and a baseline one
(GCC function multi-versioning, plus the AVX2-intrinsics kernels of tied_conv2d and
group_norm_silu beside their portable twins), and the CPU picks one at load time; the fused
step's Box-Muller also has an AVX-512 variant. The rest of the suite tests whichever variant this
CPU picks; this file checks which one that is, and runs the op tests again against a build that
holds only the baseline variant (SYMFAST_ISA=baseline, symfast/_build.py): the code a CPU without
AVX2 runs; on a CPU with AVX-512, also against a build without the AVX-512 variant
(SYMFAST_ISA=avx2): the code an AVX2-only CPU runs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from symfast._build import CPU_OPS

ROOT = Path(__file__).resolve().parent.parent
OP_TESTS = ["tests/test_group_average.py", "tests/test_fused_step.py", "tests/test_tied_conv2d.py",
            "tests/test_attention_pool.py", "tests/test_classifier_select.py",
            "tests/test_group_norm_silu.py"]

needs_toolchain = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None or shutil.which("nm") is None,
    reason="needs a C++ compiler and nm")


def _cpu_has(*names: str) -> bool:
    """Whether /proc/cpuinfo lists every one of the CPU flags ``names``."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return all(name in flags for name in names)


def _cpu_has_avx2_fma() -> bool:
    return _cpu_has("avx2", "fma")


def _cpu_has_avx512() -> bool:
    return _cpu_has("avx512f", "avx512vl", "avx512dq")


def _clone_symbols(library: Path) -> list[str]:
    """The AVX2 clones GCC's target_clones emitted into a module (`<fn>.avx2`, `<fn>.avx2.<n>`)."""
    names = subprocess.run(["nm", str(library)], capture_output=True, text=True, check=True).stdout
    return [line for line in names.splitlines() if re.search(r"\.avx2(\.\d+)?$", line)]


def _loaded_libraries() -> dict[str, Path]:
    """The symfast CPU modules mapped into this process (prebuilt or compiled on first use)."""
    maps = Path("/proc/self/maps").read_text().split()
    return {Path(p).name.split(".")[0][len("_cpu_"):]: Path(p)
            for p in maps if p.startswith("/") and Path(p).name.startswith("_cpu_")}


@needs_toolchain
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_default_build_carries_the_avx2_variant():
    """The rest of the suite ran the AVX2 variant on a CPU with AVX2: the modules symfast loads
    hold the clones (every op but group_norm_silu, whose AVX2 kernel is written explicitly)."""
    from symfast._ext import load_cpu_kernels
    unavailable = [op for op in CPU_OPS if not load_cpu_kernels(op)]
    if unavailable:
        pytest.skip(f"CPU kernels unavailable: {unavailable}")
    loaded = _loaded_libraries()
    assert set(loaded) == set(CPU_OPS), loaded
    for op in CPU_OPS:
        if op != "group_norm_silu":
            assert _clone_symbols(loaded[op]), f"{op}: no AVX2 clone in {loaded[op]}"


def _build_env(tmp: Path, isa: str = "baseline") -> dict[str, str]:
    return {**os.environ, "SYMFAST_ISA": isa, "SYMFAST_FORCE_JIT": "1",
            "TORCH_EXTENSIONS_DIR": str(tmp / "ext"), "OMP_NUM_THREADS": "1",
            "TRITON_INTERPRET": "1"}


def _build(op: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = ("import sys; from symfast._ext import load_cpu_kernels, load_errors; "
            f"sys.exit(0 if load_cpu_kernels({op!r}) else str(load_errors))")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True)


@needs_toolchain
@pytest.mark.skipif(not _cpu_has_avx2_fma(), reason="the baseline variant is what this CPU runs")
def test_baseline_variant_passes_the_op_tests(tmp_path):
    env = _build_env(tmp_path)
    # one build per core: the six modules compile in about half the time of one after another
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        builds = dict(zip(CPU_OPS, pool.map(lambda op: _build(op, env), CPU_OPS)))
    failed = {op: b.stderr[-2000:] for op, b in builds.items() if b.returncode != 0}
    assert not failed, f"baseline builds failed: {failed}"
    libraries = sorted((tmp_path / "ext").rglob("_cpu_*.so"))
    assert {p.stem for p in libraries} == {f"_cpu_{op}" for op in CPU_OPS}, libraries
    for library in libraries:
        assert not _clone_symbols(library), f"{library.name} still holds AVX2 clones"
    # the op tests, CPU kernel cases only, against the baseline modules (loaded from the cache
    # the builds above filled: same flags, so nothing recompiles)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "cpu", *OP_TESTS], env=env, cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


# Normals of rows of several lengths (whole and partial Philox counters, row starts off a
# multiple of 4), drawn alone and inside a step, in float32 and float64: saved to sys.argv[1].
_DRAW_NORMALS = """
import sys, torch
from symfast._ext import load_cpu_kernels
from symfast.ops.fused_step import StepCoefficients, fused_step
from symfast.philox import noise_key
assert load_cpu_kernels("fused_step")
key, drawn = noise_key([3, 2**40 + 9], 2), []
for n in (7, 64, 81, 515, 4096):
    for dtype in (torch.float32, torch.float64):
        out = torch.empty(6, n, dtype=dtype)
        torch.ops.symfast.fused_step_cpu_noise(key, 3, 11, out)
        x, y = torch.zeros(2, 3, n, dtype=dtype), torch.zeros(4, 3, n, dtype=dtype)
        z, _ = fused_step(x, y, StepCoefficients(c=1.0), "flip_h", key=key, step=11, backend="cpu")
        drawn += [out, z]
torch.save(drawn, sys.argv[1])
"""


@needs_toolchain
@pytest.mark.skipif(not _cpu_has_avx512(), reason="the AVX-512 variant runs only on AVX-512 CPUs")
def test_avx2_variant_draws_the_avx512_variants_bits(tmp_path):
    """This CPU's default build draws normals with the AVX-512 Box-Muller; the build without it
    (what an AVX2-only CPU runs) draws the same bits and passes the fused step's tests."""
    default = subprocess.run(["nm", "-C", str(_loaded_fused_step())], capture_output=True,
                             text=True, check=True).stdout
    assert "box_muller_avx512" in default
    env = _build_env(tmp_path, isa="avx2")
    built = _build("fused_step", env)
    assert built.returncode == 0, built.stderr[-2000:]
    (library,) = (tmp_path / "ext").rglob("_cpu_fused_step*.so")
    assert "box_muller_avx512" not in subprocess.run(
        ["nm", "-C", str(library)], capture_output=True, text=True, check=True).stdout
    saved = {}
    for name, run_env in (("avx512", {**os.environ, "OMP_NUM_THREADS": "1"}), ("avx2", env)):
        saved[name] = tmp_path / f"{name}.pt"
        run = subprocess.run([sys.executable, "-c", _DRAW_NORMALS, str(saved[name])], env=run_env,
                             cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    import torch
    wide, narrow = torch.load(saved["avx512"]), torch.load(saved["avx2"])
    assert len(wide) == len(narrow) == 20
    for a, b in zip(wide, narrow):
        assert torch.equal(a, b)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "cpu", "tests/test_fused_step.py"], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


def _loaded_fused_step() -> Path:
    from symfast._ext import load_cpu_kernels
    if not load_cpu_kernels("fused_step"):
        pytest.skip("the fused_step CPU kernel is unavailable")
    return _loaded_libraries()["fused_step"]
