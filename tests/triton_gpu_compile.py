"""Compile every Triton kernel symfast launches for a CUDA GPU, on a machine without one.

    python tests/triton_gpu_compile.py --arch 90 [--out results.json]

Under TRITON_INTERPRET=1 (how the tests run Triton on the CPU) nothing is compiled: a kernel that
the interpreter runs correctly can still fail to compile for a GPU (a type the code generator
refuses, a constexpr misuse, shared memory over the limit). This script drives every op's Triton
launchers through the public ops (forward and backward, fp32 / bf16 / fp64, odd shapes, every
option that changes a kernel's specialisation) with CPU tensors standing in for CUDA ones, and
turns each launch into an ahead-of-time compile for ``sm_<arch>``: Triton's own specialisation
of the arguments (dtypes, integer values of 1, 16-byte alignment), then TTIR -> TTGIR -> LLVM IR
-> PTX -> cubin with the ptxas that ships with Triton. No kernel runs, so the outputs hold
garbage; only the compiles are checked. Each distinct compile is reported once, with its
registers, shared memory and spill (local memory) bytes read from the cubin by cuobjdump. Each
op call runs twice, and the second call's host reads of tensor values (item, bool, int, ...:
each a device sync on a GPU) made from symfast's code are reported too.

It must run in a process of its own: triton has to be imported without TRITON_INTERPRET so that
@triton.jit makes real JIT functions (tests/test_triton_gpu_compile.py runs it that way).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import pkgutil
import re
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Largest shared memory one block may use (bytes, opt-in dynamic), per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _CompileOnlyDriver:
    """What JITFunction.run asks of the active driver before it compiles: a device, a stream
    and the target to compile for. Launching is never reached (run is called with warmup=True)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _resources(cubin: bytes) -> dict[str, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    return dict(zip(("registers", "shared", "local"), map(int, found.groups())))


def _name(jit: JITFunction) -> str:
    """module.kernel: two modules have a _forward_kernel."""
    return f"{jit.fn.__module__.rsplit('.', 1)[-1]}.{jit.fn.__name__}"


def _float32_cut(args: tuple) -> list[float]:
    """The Python floats of a launch on float64 tensors that float32 cannot hold exactly."""
    if not any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
        return []

    def exact(k: float) -> bool:
        try:
            return not math.isfinite(k) or struct.unpack("f", struct.pack("f", k))[0] == k
        except OverflowError:
            return False
    return [a for a in args if isinstance(a, float) and not exact(a)]


def _install(arch: int, records: list[dict], errors: list[dict]) -> None:
    """Every launch of a JIT function compiles (once per specialisation) instead of running."""
    driver.set_active(_CompileOnlyDriver(arch))
    run = JITFunction.run
    seen: set[int] = set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        dims = tuple(grid) if isinstance(grid, (tuple, list)) else ()
        if any(isinstance(d, int) and d > 65535 for d in dims[1:]):  # Triton's launcher does not check
            errors.append({"kernel": _name(self), "error": f"grid {dims}: CUDA allows at most 65535 "
                           f"programs in grid dimensions 1 and 2 (kernels/_grid.py)"})
        cut = _float32_cut(args)
        if cut:  # a compiled kernel takes a Python float as float32; the interpreter does not
            errors.append({"kernel": _name(self), "error": f"a float64 launch passes {cut}, which a "
                           f"compiled kernel rounds to float32: pass (hi, lo), kernels/_scalars.py"})
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # reported, and the op goes on with its next launch
            errors.append({"kernel": _name(self), "error": f"{type(exc).__name__}: {exc}"})
            return None
        if id(kernel) not in seen:
            seen.add(id(kernel))
            records.append({"kernel": _name(self), "num_warps": kernel.metadata.num_warps,
                            "triton_shared": kernel.metadata.shared,
                            "dtypes": sorted({str(a.dtype) for a in args if isinstance(a, torch.Tensor)}),
                            "constexprs": {k: str(v) for k, v in kwargs.items()},
                            "compile_s": round(time.perf_counter() - start, 3),
                            **_resources(kernel.asm["cubin"])})
        return kernel

    JITFunction.run = compile_only


# Tensor methods that read a value on the host: on a GPU each waits for the device (a sync).
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def _host_reads():
    """Records "file:line method" for every host read made from symfast's code (symfast/,
    kernels/) inside the block: what a call costs in device syncs once its one-time work is done."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name):
        def read(self, *args, **kwargs):
            ours = [f for f in traceback.extract_stack()[:-1]
                    if "/symfast/" in f.filename or "/kernels/" in f.filename]
            if ours:
                reads.append(f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {name}")
            return originals[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield reads
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def _grad(outputs, inputs) -> None:
    outputs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))
               if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs], allow_unused=True)


def _cases():
    """(name, thunk) for every op call: forward, and backward where the op has one."""
    from symfast.ops import (StepCoefficients, attention_pool, classifier_select, fused_step,
                             group_norm_silu, orbit, orbit_mean, tied_conv2d)
    from symfast.groups import get
    from symfast.philox import noise_key
    from symfast.reference.tied_conv2d import kernel_orbits

    t = dict(backend="triton")
    dtypes = (torch.float32, torch.bfloat16, torch.float64)

    def leaf(*shape, dtype):
        return torch.randn(*shape).to(dtype).requires_grad_()

    for dtype in dtypes:
        for group, shape in (("d4", (2, 3, 9, 9)), ("c4", (2, 4, 16, 16)), ("flip_h", (3, 11))):
            x = leaf(*shape, dtype=dtype)

            def orbit_case(x=x, group=group):
                _grad(orbit(x, group, **t), [x])

            def orbit_mean_case(x=x, group=group, shape=shape):
                y = torch.randn(len(get(group)) * shape[0], *shape[1:]).to(dtype).requires_grad_()
                _grad(orbit_mean(y, group, **t), [y])
            yield f"orbit {group} {tuple(shape)} {dtype}", orbit_case
            yield f"orbit_mean {group} {tuple(shape)} {dtype}", orbit_mean_case

        coefs = StepCoefficients(c_skip=0.9, c_out=-0.3, a=0.7, b=0.2, p=0.1, q=-0.05, c=0.4)
        for group, shape in (("d4", (2, 3, 9, 9)), ("c2", (3, 2, 5, 7)), (None, (5, 3, 4))):
            order = len(get(group)) if group else 1
            x, y = torch.randn(shape).to(dtype), torch.randn(order * shape[0], *shape[1:]).to(dtype)
            u, v = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
            key = noise_key(1234, shape[0])
            modes = {"philox": dict(key=key), "tensor": dict(noise=torch.randn(shape).to(dtype)),
                     "none": {}}
            if group is not None:
                modes["philox transformed"] = dict(key=key, noise_element=order - 1)
            for mode, extra in modes.items():
                c = coefs if mode != "none" else coefs._replace(c=0.0)

                def step_case(x=x, y=y, u=u, v=v, c=c, group=group, extra=extra):
                    fused_step(x, y, c, group, u=u, v=v, step=7, **extra, **t)
                    fused_step(x, y, c, group, step=7, return_denoised=False, **extra, **t)
                yield f"fused_step {group} {shape} {mode} {dtype}", step_case

        for shape, groups in (((2, 6, 5, 7), 3), ((2, 4, 9), 2), ((1, 8, 3, 4, 5), 4)):
            for has_w, has_b, with_shift in ((True, True, True), (False, False, False),
                                             (True, False, False), (False, True, True)):
                x = leaf(*shape, dtype=dtype)
                w = leaf(shape[1], dtype=dtype) if has_w else None
                b = leaf(shape[1], dtype=dtype) if has_b else None
                s = leaf(shape[0], shape[1], dtype=dtype) if with_shift else None

                def norm_case(x=x, w=w, b=b, s=s, groups=groups):
                    _grad(group_norm_silu(x, groups, w, b, 1e-5, shift=s, **t),
                          [a for a in (x, w, b, s) if a is not None])
                yield f"group_norm_silu {shape} weight={has_w} bias={has_b} shift={with_shift} {dtype}", norm_case

        for group, k, stride, padding, bias in (("d4", 3, 1, 1, True), ("d4", 3, 2, 0, False),
                                                ("c4", 5, 1, 2, True), ("flip_h", 3, 1, 1, True)):
            r = kernel_orbits(get(group), (k, k)).count
            x, w = leaf(2, 3, 9, 10, dtype=dtype), leaf(5, 3, r, dtype=dtype)
            b = leaf(5, dtype=dtype) if bias else None

            def conv_case(x=x, w=w, b=b, k=k, group=group, stride=stride, padding=padding):
                _grad(tied_conv2d(x, w, b, k, group, stride, padding, **t),
                      [a for a in (x, w, b) if a is not None])
            yield f"tied_conv2d {group} {k}x{k} stride={stride} bias={bias} {dtype}", conv_case

        vocab, dim, dk = 13, 6, 5
        tokens = torch.randint(0, vocab, (3, 7))
        # (lengths, mask_padding, return_weights, which of embedding / keys / query need a
        # gradient): each kernel flag (MASK, HAS_GW, NEED_E, NEED_K, NEED_Q) both ways
        for lengths, mask, weights, needs in (
                (torch.tensor([7, 3, 1]), True, True, (True, True, True)),
                (torch.tensor([7, 3, 1]), False, False, (True, False, False)),
                (None, True, False, (False, False, True)),
                (None, False, True, (False, True, True))):
            emb, keys, query = (leaf(*s, dtype=dtype).requires_grad_(need)
                                for s, need in zip(((vocab, dim), (vocab, dk), (dk,)), needs))

            def pool_case(lengths=lengths, mask=mask, weights=weights, tables=(emb, keys, query)):
                _grad(attention_pool(tokens, lengths, *tables, mask, weights, **t),
                      [a for a in tables if a.requires_grad])
            yield (f"attention_pool lengths={lengths is not None} mask={mask} weights={weights} "
                   f"needs={needs} {dtype}"), pool_case

        h, gw, gb = leaf(5, 7, dtype=dtype), leaf(3, 7, dtype=dtype), leaf(3, dtype=dtype)
        cw, cb = leaf(3, 4, 7, dtype=dtype), leaf(3, 4, dtype=dtype)

        def select_case(args=(h, gw, gb, cw, cb)):
            _grad(classifier_select(*args, 0.7, **t), list(args))
        yield f"classifier_select {dtype}", select_case

    # Whole sampling loops with symfast's networks, frame averaging and Philox noise: a sampler
    # step must not wait for the device either.
    from symfast import Denoiser, sample
    from symfast.nn import EquivariantUNet, UNet
    loops = {
        "heun, churn, FA": (Denoiser(UNet(1, 1, (8, 16), backend="triton"), "edm", group="d4", **t),
                            "heun", dict(s_churn=1.0)),
        "euler_ancestral, FA": (Denoiser(UNet(1, 1, (8, 16), backend="triton"), "edm", group="d4",
                                         **t), "euler_ancestral", {}),
        "ddim eta=1, WT, noise transformed": (
            Denoiser(EquivariantUNet(1, 1, (8, 16), "d4", backend="triton"), "eps", group="d4", **t),
            "ddim", dict(eta=1.0, transform_noise=3)),
        "dpmpp_2m": (Denoiser(UNet(1, 1, (8, 16), backend="triton"), "edm", **t), "dpmpp_2m", {}),
    }
    for name, (denoiser, sampler, options) in loops.items():
        def loop_case(denoiser=denoiser, sampler=sampler, options=options):
            sample(denoiser, (2, 1, 8, 8), sampler, steps=3, seed=0, progress=False, **options)
        yield f"sampler {name}", loop_case

    # Sizes people use, where the launchers pick their largest blocks (the shapes above are
    # small): a block that fits the interpreter can spill or overflow a GPU's registers.
    for dtype in dtypes:
        def large_cases(dtype=dtype):
            x = leaf(2, 3, 64, 64, dtype=dtype)
            _grad(orbit(x, "d4", **t), [x])
            y = leaf(16, 3, 64, 64, dtype=dtype)
            _grad(orbit_mean(y, "d4", **t), [y])
            fused_step(x.detach(), y.detach(), coefs, "d4", key=noise_key(0, 2), step=3, **t)
            for shape in ((2, 64, 32, 32), (2, 512, 4, 4), (2, 8, 128, 128)):
                x, w, b, s = (leaf(*shape, dtype=dtype), leaf(shape[1], dtype=dtype),
                              leaf(shape[1], dtype=dtype), leaf(shape[0], shape[1], dtype=dtype))
                _grad(group_norm_silu(x, 8, w, b, 1e-5, shift=s, **t), [x, w, b, s])
            x, w, b = leaf(2, 64, 32, 32, dtype=dtype), leaf(64, 64, 3, dtype=dtype), leaf(64, dtype=dtype)
            _grad(tied_conv2d(x, w, b, 3, "d4", 1, 1, **t), [x, w, b])
            # a 4096 x 4096 plane: 65536 blocks of 256, past CUDA's cap on grid dimension 1
            x, w = leaf(1, 1, 4096, 4096, dtype=dtype), leaf(1, 1, 3, dtype=dtype)
            _grad(tied_conv2d(x, w, None, 3, "d4", 1, 1, **t), [x, w])
            # a text classifier's sentences (up to 512 tokens) and 300-d embeddings
            tokens = torch.randint(0, 1000, (4, 512))
            tables = (leaf(1000, 300, dtype=dtype), leaf(1000, 64, dtype=dtype), leaf(64, dtype=dtype))
            _grad(attention_pool(tokens, torch.tensor([512, 300, 7, 1]), *tables, True, True, **t),
                  list(tables))
            # CAB-CNN's head at the README's size, and one with 1000 classes
            for k, c, f in ((16, 50, 512), (8, 1000, 256)):
                args = (leaf(64, f, dtype=dtype), leaf(k, f, dtype=dtype), leaf(k, dtype=dtype),
                        leaf(k, c, f, dtype=dtype), leaf(k, c, dtype=dtype))
                _grad(classifier_select(*args, 1.0, **t), list(args))
        yield f"large sizes {dtype}", large_cases


def check(arch: int) -> dict:
    """Compile every launch for sm_<arch>: {"compiled": [...], "errors": [...], "cases": n}."""
    records: list[dict] = []
    errors: list[dict] = []
    _install(arch, records, errors)
    # The ops refuse backend="triton" for CPU tensors unless the interpreter is on; the kernels
    # were imported (and jitted) above without it, so only the ops' check is told it is on.
    from symfast import _backend
    _backend.triton_interpret = lambda: True
    cases, host_reads = 0, []
    for name, case in _cases():
        cases += 1
        try:
            case()  # compiles; one-time work (table checks) happens here
            with _host_reads() as reads:
                case()
        except Exception as exc:
            errors.append({"case": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if reads:
            host_reads.append({"case": name, "reads": reads})
    limit = SHARED_LIMIT.get(arch)
    for r in records:
        r["over_shared_limit"] = limit is not None and r["triton_shared"] > limit
    return {"arch": arch, "triton": triton.__version__, "cases": cases, "compiled": records,
            "errors": errors, "host_reads": host_reads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--out", type=Path, help="write the report here (JSON)")
    args = parser.parse_args(argv)
    # Import every kernel module now, before anything could set TRITON_INTERPRET.
    import symfast.kernels
    for module in pkgutil.iter_modules(symfast.kernels.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"symfast.kernels.{module.name}")
    report = check(args.arch)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    by_kernel: dict[str, list[dict]] = {}
    for r in report["compiled"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    print(f"sm_{args.arch}: {report['cases']} op calls, {len(report['compiled'])} compiles, "
          f"{len(report['errors'])} errors (triton {report['triton']})")
    for kernel, rs in sorted(by_kernel.items()):
        print(f"  {kernel:44s} {len(rs):3d} variants  registers <= {max(r['registers'] for r in rs):3d}"
              f"  shared <= {max(r['triton_shared'] for r in rs):6d} B"
              f"  spill <= {max(r['local'] for r in rs):4d} B")
    places: dict[str, list[int]] = {}
    for r in report["host_reads"]:
        for place in set(r["reads"]):
            places.setdefault(place, []).append(r["reads"].count(place))
    for place, counts in sorted(places.items()):
        print(f"  host read {place}: in {len(counts)} of the op calls, at most {max(counts)} per call")
    for e in report["errors"]:
        print("  ERROR", e)
    return 1 if report["errors"] or any(r["over_shared_limit"] for r in report["compiled"]) else 0


if __name__ == "__main__":
    sys.exit(main())
