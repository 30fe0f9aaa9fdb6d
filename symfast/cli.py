"""The `symfast` command: `symfast info`, `symfast bench <name> [args]`."""
from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "group-average": "bench_group_average.py",
    "sampler": "bench_sampler.py",
    "tied-conv": "bench_tied_conv.py",
    "attention": "bench_attention.py",
    "classifier-select": "bench_classifier_select.py",
    "symmetrize": "bench_symmetrize.py",
}
CPU_OPS = ("group_average", "fused_step", "tied_conv2d", "attention_pool", "classifier_select")


def info() -> int:
    import torch

    import symfast
    from symfast import _backend
    from symfast._ext import load_cpu_kernels, load_errors

    print(f"symfast {symfast.__version__}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
          f"{', CUDA ' + torch.version.cuda if torch.cuda.is_available() else ', no CUDA device'}")
    print("backends:")
    print("  reference: available (plain PyTorch)")
    for op in CPU_OPS:
        ok = load_cpu_kernels(op)
        print(f"  cpu/{op}: {'available' if ok else 'missing: ' + load_errors.get(op, '?')}")
    ok, why = _backend.triton_status()
    if not ok:
        print(f"  triton: missing: {why}")
    elif torch.cuda.is_available():
        print("  triton: available (compiled for CUDA)")
    elif _backend.triton_interpret():
        print("  triton: available on CPU tensors through the interpreter (TRITON_INTERPRET=1)")
    else:
        print("  triton: installed, but no CUDA device; set TRITON_INTERPRET=1 before importing "
              "triton to run its kernels on CPU tensors")
    return 0


def bench(name: str, args: list[str]) -> int:
    script = _REPO / "benchmarks" / BENCHMARKS[name]
    if not script.exists():
        print(f"benchmark script {script} not found: benchmarks ship with the source tree "
              f"(pip install -e . from a checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))  # as `python benchmarks/<script>` would
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = argparse.ArgumentParser(prog="symfast", description="symfast command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, and which backends are available (and why not)")
    bench_parser = sub.add_parser("bench", help="run a benchmark script (args are passed on)")
    bench_parser.add_argument("name", choices=sorted(BENCHMARKS))
    bench_parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    if ns.command == "info":
        return info()
    return bench(ns.name, ns.args)


if __name__ == "__main__":
    raise SystemExit(main())
