"""How symmetrize should batch the orbit on CPU: per-image time of a small UNet vs call batch size,
and D4 frame averaging of a batch of 16 with chunks = 1, 2, 4, 8.

Uses diffusers' UNet2DModel (about 1.1M parameters at 32x32) when diffusers is installed, else a
small conv net. Run: python benchmarks/bench_symmetrize.py [--repeats N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, print_table, write_results  # noqa: E402

from symfast import symmetrize  # noqa: E402


def small_unet() -> tuple[torch.nn.Module, str]:
    try:
        from diffusers import UNet2DModel
    except ImportError:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.SiLU(),
                                  torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(),
                                  torch.nn.Conv2d(64, 3, 3, padding=1))
        return (lambda x, t: net(x)), "conv net (diffusers not installed)"
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()
    params = sum(p.numel() for p in unet.parameters())
    return (lambda x, t: unet(x, t).sample), f"diffusers UNet2DModel ({params / 1e6:.2f}M params)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    model, label = small_unet()
    rows = []
    with torch.no_grad():
        for batch in (16, 32, 64, 128):
            x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500.0)
            s = median_time(lambda: model(x, t), repeats=args.repeats, warmup=1)
            rows.append({"part": "one call", "batch": batch, "ms": s * 1e3,
                         "ms_per_image": s * 1e3 / batch})
        x, t = torch.randn(16, 3, 32, 32), torch.full((16,), 500.0)
        for chunks in (1, 2, 4, 8):
            fa = symmetrize(model, "d4", chunks=chunks)
            s = median_time(lambda: fa(x, t), repeats=args.repeats, warmup=1)
            rows.append({"part": f"D4 FA, B=16, chunks={chunks}", "batch": 128 // chunks,
                         "ms": s * 1e3, "ms_per_image": s * 1e3 / 128})
    print(f"model: {label}, {torch.get_num_threads()} threads")
    print_table(rows, ["part", "batch", "ms", "ms_per_image"])
    path = write_results("symmetrize", {"model": label, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
