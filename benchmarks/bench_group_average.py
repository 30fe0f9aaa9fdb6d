"""orbit_mean and orbit: the eager loop people write today vs torch.compile of it vs symfast's kernel.

For D4 and C4 in fp32 at (64, 3, 64, 64) and (16, 4, 128, 128): median time, GB/s (bytes the op
must read + write), and the share of the copy bandwidth measured in the same run. orbit is also
timed writing into one reused buffer ("symfast cpu (out=)"), as a caller in a loop would.
Run: python benchmarks/bench_group_average.py [--repeats N] [--quick]   (or: symfast bench group-average)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, median_time, print_table, write_results  # noqa: E402

from symfast import groups  # noqa: E402
from symfast.ops import orbit, orbit_mean  # noqa: E402
from symfast.profiling import costs  # noqa: E402

SHAPES = [(64, 3, 64, 64), (16, 4, 128, 128)]


def _eager_elements(name: str):
    """The transforms as people write them: torch.rot90 / torch.flip, with their inverses."""
    rots = [lambda x, k=k: torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    inv_rots = [lambda x, k=k: torch.rot90(x, -k, dims=(-2, -1)) for k in range(4)]
    if name == "c4":
        return rots, inv_rots
    refl = [lambda x, k=k: torch.rot90(torch.flip(x, dims=(-1,)), k, dims=(-2, -1)) for k in range(4)]
    inv_refl = [lambda x, k=k: torch.flip(torch.rot90(x, -k, dims=(-2, -1)), dims=(-1,)) for k in range(4)]
    return rots + refl, inv_rots + inv_refl


def eager_orbit_mean(y: torch.Tensor, inverses) -> torch.Tensor:
    blocks = y.chunk(len(inverses), dim=0)
    total = inverses[0](blocks[0])
    for inv, block in zip(inverses[1:], blocks[1:]):
        total = total + inv(block)
    return total / len(inverses)


def eager_orbit(x: torch.Tensor, forwards) -> torch.Tensor:
    return torch.cat([g(x) for g in forwards], dim=0)


def run(repeats: int = 20, shapes=SHAPES, group_names=("d4", "c4")) -> list[dict]:
    bandwidth = copy_bandwidth()
    rows = []
    for name in group_names:
        group = groups.get(name)
        forwards, inverses = _eager_elements(name)
        for shape in shapes:
            x = torch.randn(shape)
            y = torch.randn((len(group) * shape[0],) + shape[1:])
            buffer = torch.empty((len(group) * shape[0],) + shape[1:])
            for check_g, check_ref in ((orbit_mean(y, group), eager_orbit_mean(y, inverses)),
                                       (orbit(x, group), eager_orbit(x, forwards)),
                                       (orbit(x, group, out=buffer), eager_orbit(x, forwards))):
                torch.testing.assert_close(check_g, check_ref, rtol=1e-6, atol=1e-6)
            compiled_mean = torch.compile(lambda t: eager_orbit_mean(t, inverses))
            compiled_orbit = torch.compile(lambda t: eager_orbit(t, forwards))
            # the same for orbit_mean: each reads one side and writes the other
            nbytes = costs.orbit(x, group).bytes
            variants = {
                "orbit_mean": {
                    "eager loop": lambda: eager_orbit_mean(y, inverses),
                    "torch.compile(loop)": lambda: compiled_mean(y),
                    "symfast cpu": lambda: orbit_mean(y, group, backend="cpu"),
                },
                "orbit": {
                    "eager loop": lambda: eager_orbit(x, forwards),
                    "torch.compile(loop)": lambda: compiled_orbit(x),
                    "symfast cpu": lambda: orbit(x, group, backend="cpu"),
                    # a caller in a loop writing into one buffer: no fresh |G|·x allocation
                    # (whose pages fault in on every call once it is beyond malloc's reuse)
                    "symfast cpu (out=)": lambda: orbit(x, group, backend="cpu", out=buffer),
                },
            }
            for op, fns in variants.items():
                times = {v: median_time(fn, repeats=repeats, warmup=3) for v, fn in fns.items()}
                for variant, seconds in times.items():
                    rows.append({
                        "op": op, "group": name, "shape": "x".join(map(str, shape)),
                        "variant": variant, "ms": seconds * 1e3,
                        "GB/s": nbytes / seconds / 1e9,
                        "share_of_copy_bw": nbytes / seconds / bandwidth,
                        "speedup_vs_eager": times["eager loop"] / seconds,
                        "speedup_vs_compile": times["torch.compile(loop)"] / seconds,
                        "floor_ms": nbytes / bandwidth * 1e3,
                    })
    return rows, bandwidth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="D4 at the first shape only")
    args = parser.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    names = ("d4",) if args.quick else ("d4", "c4")
    rows, bandwidth = run(args.repeats, shapes, names)
    print(f"copy bandwidth measured in this run: {bandwidth / 1e9:.1f} GB/s "
          f"({torch.get_num_threads()} threads)")
    print_table(rows, ["op", "group", "shape", "variant", "ms", "GB/s", "share_of_copy_bw",
                       "speedup_vs_eager", "speedup_vs_compile"])
    # --quick measures fewer shapes: not over the whole committed run
    path = write_results("group_average", {"copy_bandwidth_GBps": bandwidth / 1e9, "rows": rows},
                         subset="quick" if args.quick else None)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
