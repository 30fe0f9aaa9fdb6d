"""symfast inside a diffusers pipeline: ``equivariant(pipe, "d4")`` against the same pipeline with a
Python loop over the 8 group elements.

DDIMPipeline, a small UNet2DModel (2 levels, 32/64 channels) at 32×32, batch 8, 50 steps, D4
frame averaging, fp32 on the CPU, both from the same seeded generator:
- symfast: ``equivariant(pipe, "d4")``: the orbit in batched UNet calls chosen per device (on the
  CPU calls of 16 images: 4 per step here), and the orbit average + DDIM update in one
  ``symfast::fused_step`` op;
- loop: ``LoopAveragedUNet`` (8 UNet calls on g_k x, each output mapped back by g_k⁻¹ and summed)
  with diffusers' own DDIMScheduler.

Reported in one run: the images' max abs difference, wall time (median over repeats, the two
variants alternating so the machine's load drifts over both alike), the UNet's own time (forward
hooks on the UNet2DModel) and the rest, the non-network time, per step and as a share of a step.
Targets: symfast's non-network time ≤ 1% of a step, and symfast faster than the loop by at least the
non-network time it removes. ``--quick``: 2 repeats instead of 5.

    OMP_NUM_THREADS=1 python benchmarks/bench_integrations.py --quick
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import print_table, write_results
from symfast.profiling.timing import Timing, measure


def _unet():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


class _NetworkClock:
    """Seconds spent inside a module's forward (CPU calls are synchronous), via forward hooks."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._start = 0.0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._start


def run(steps: int, batch: int, repeats: int) -> dict:
    from diffusers import DDIMPipeline, DDIMScheduler

    from symfast.integrations.diffusers import LoopAveragedUNet, equivariant

    unet = _unet()
    clock = _NetworkClock(unet)
    scheduler = DDIMScheduler(clip_sample=False)  # clipping x̂0 is not linear: it would not fuse
    ours = equivariant(DDIMPipeline(unet=unet, scheduler=scheduler), "d4")
    loop = DDIMPipeline(unet=LoopAveragedUNet(unet, "d4"), scheduler=scheduler)
    variants = {"loop": loop, "symfast": ours}
    images, network, timings = {}, {name: [] for name in variants}, {name: [] for name in variants}
    latents = {}
    for name, pipe in variants.items():  # keep the last step's latents: images are clamped to [0, 1]
        def recording(*args, _step=pipe.scheduler.step, _name=name, **kwargs):
            out = _step(*args, **kwargs)
            latents[_name] = out.prev_sample
            return out
        pipe.scheduler.step = recording

    def call(name: str, n: int):
        pipe = variants[name]
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=batch, num_inference_steps=n, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    for name in variants:  # warm-up: allocator, one-time tables, lazily loaded extension
        call(name, 2)
    for _ in range(repeats):
        for name in variants:
            clock.seconds = 0.0
            timing = measure(lambda: images.__setitem__(name, call(name, steps)), repeats=1, warmup=0)
            timings[name].append(timing.times[0])
            network[name].append(clock.seconds)

    out = {"steps": steps, "batch": batch, "image": [3, 32, 32], "group": "d4", "repeats": repeats,
           "unet_parameters": sum(p.numel() for p in unet.parameters())}
    rows = []
    for name in variants:
        total = Timing(tuple(timings[name]))
        rest = [t - n for t, n in zip(timings[name], network[name])]
        step_s = total.median / steps
        row = {"variant": name, "total_s": total.median, "network_s": statistics.median(network[name]),
               "non_network_s": statistics.median(rest), "step_ms": 1e3 * step_s,
               "non_network_per_step_ms": 1e3 * statistics.median(rest) / steps,
               "non_network_share_of_step": statistics.median(rest) / total.median,
               "total_q10_s": total.quantile(0.1), "total_q90_s": total.quantile(0.9)}
        rows.append(row)
        out[name] = row
    saved = out["loop"]["total_s"] - out["symfast"]["total_s"]
    removed = out["loop"]["non_network_s"] - out["symfast"]["non_network_s"]
    a, b = images["symfast"], images["loop"]
    out.update({
        "max_abs_diff_images": float((a.double() - b.double()).abs().max()),
        "max_abs_diff_latents": float((latents["symfast"].double() - latents["loop"].double()).abs().max()),
        "max_abs_latent": float(latents["loop"].abs().max()),
        # pipelines clamp images to [0, 1]: the share strictly inside says how much the diff covers
        "unclamped_pixel_share": float(((b > 0) & (b < 1)).double().mean()),
        "speedup": out["loop"]["total_s"] / out["symfast"]["total_s"],
        "time_saved_s": saved, "non_network_removed_s": removed,
        "faster_by_at_least_the_overhead_removed": saved >= removed,
        "target_non_network_share_le_1pct": out["symfast"]["non_network_share_of_step"] <= 0.01,
    })
    print_table(rows, ["variant", "total_s", "network_s", "non_network_s", "step_ms",
                       "non_network_per_step_ms", "non_network_share_of_step"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. the machine was loaded)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    result = run(args.steps, args.batch, 2 if args.quick else args.repeats)
    result["quick"] = args.quick
    result["note"] = args.note
    for key in ("max_abs_diff_images", "max_abs_diff_latents", "max_abs_latent", "unclamped_pixel_share", "speedup", "time_saved_s",
                "non_network_removed_s", "faster_by_at_least_the_overhead_removed",
                "target_non_network_share_le_1pct"):
        print(f"{key}: {result[key]}")
    print("wrote", write_results("integrations", result))


if __name__ == "__main__":
    main()
