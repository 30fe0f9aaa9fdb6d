"""Every Triton kernel compiles for a CUDA GPU (sm_90; others on request), checked on a machine
without one.

The Triton tests run the kernels under TRITON_INTERPRET=1, which compiles nothing: a kernel the
interpreter runs can still fail to compile for a GPU (the float64 noise path of fused_step read a
plain-float global and did). tests/triton_gpu_compile.py drives every op's launchers with CPU
tensors and compiles each launch to a cubin instead of running it; it runs in its own process,
where triton is imported without the interpreter.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "triton_gpu_compile.py"


def _ptxas_available() -> bool:
    try:
        import triton
    except Exception:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _ptxas_available(),
                                reason="triton with its NVIDIA backend (ptxas) is not installed")


def _run(args, tmp_path, code=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path.parent / "triton-cache")  # shared by this session's tests
    script = SCRIPT
    if code is not None:  # a file: triton.jit reads its function's source
        script = tmp_path / "case.py"
        script.write_text(code)
    cmd = [sys.executable, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _launched_kernels() -> set[str]:
    """module.name of the kernels the launchers in kernels/ launch (`name[grid](...)`)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names |= {f"{path.stem}.{k}" for k in re.findall(r"\b(_\w+_kernel)\[", path.read_text())}
    return names


# sm_90: the GPU this project is lent (H200); SYMFAST_GPU_COMPILE_ARCHS=80,90 adds others (each
# arch is ~2 minutes of ptxas from a cold cache, 264 compiles)
ARCHS = [int(a) for a in os.environ.get("SYMFAST_GPU_COMPILE_ARCHS", "90").split(",")]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_for_the_gpu(arch, tmp_path):
    out = tmp_path / "report.json"
    proc = _run(["--arch", str(arch), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["errors"] == []
    compiled = report["compiled"]
    # every kernel the launchers launch was reached, in several specialisations
    assert {r["kernel"] for r in compiled} == _launched_kernels()
    assert len(compiled) >= 3 * len(_launched_kernels())
    for r in compiled:
        assert not r["over_shared_limit"], r
        assert r["local"] == 0, f"{r['kernel']} spills registers to local memory: {r}"
        assert 0 < r["registers"] <= 255
    # Once a call's one-time work is done (table checks), no op and no sampling loop reads a
    # value on the host (a device sync on a GPU) but attention_pool, whose token-id and length
    # range checks cost one.
    for r in report["host_reads"]:
        assert r["case"].split()[0] in ("attention_pool", "large"), r
        assert len(r["reads"]) == 1 and r["reads"][0].startswith("attention_pool.py:"), r


def test_the_check_fails_on_a_kernel_the_interpreter_runs(tmp_path):
    """The check is not vacuous: a kernel reading a plain-float global (which the interpreter
    runs) is reported as a compile error, and the same kernel with a tl.constexpr global compiles."""
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        import torch, triton, triton.language as tl
        spec = importlib.util.spec_from_file_location("triton_gpu_compile", {str(SCRIPT)!r})
        check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(check)
        records, errors = [], []
        check._install(90, records, errors)
        SCALE = 2.0
        SCALE_C = tl.constexpr(2.0)

        @triton.jit
        def plain_global(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE)

        @triton.jit
        def constexpr_global(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE_C)

        x = torch.zeros(16)
        plain_global[(1,)](x, BLOCK=16)
        constexpr_global[(1,)](x, BLOCK=16)
        print(json.dumps({{"records": records, "errors": errors}}))
    """)
    proc = _run([], tmp_path, code=code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [e["kernel"] for e in result["errors"]] == ["__main__.plain_global"]
    assert "global variable SCALE" in result["errors"][0]["error"]
    assert [r["kernel"] for r in result["records"]] == ["__main__.constexpr_global"]
