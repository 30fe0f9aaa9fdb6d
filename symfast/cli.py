"""The `symfast` command: `symfast info`, `symfast bench <name> [args]`, `symfast bench all`,
`symfast profile {sample,train,sfbd,op}`, `symfast train`, `symfast sfbd`, `symfast sample`,
`symfast denoise`, `symfast export`, `symfast demo`. Flags become a config or arguments of one
library call."""
from __future__ import annotations

import argparse
import dataclasses
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
    "group-norm-silu": "bench_group_norm_silu.py",
    "train": "bench_train.py",
    "sfbd": "bench_sfbd.py",
}


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: argparse took `sfbd --steps 5` as --steps-per-round and
    `sample --step 2` as --steps, silently; errors in one line. Subparsers are made of the
    parent's class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # one line, as the commands' own argument errors: argparse printed the whole usage first
        # (32 lines for sfbd) above the line that says what was wrong
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def info() -> int:
    import torch

    import symfast
    from symfast import _backend
    from symfast._build import CPU_OPS
    from symfast._ext import load_cpu_kernels, load_errors

    print(f"symfast {symfast.__version__}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"
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


def _bench_all_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="symfast bench all",
                                     description="every op x backend x dtype x size, with the "
                                                 "share of the machine's limit measured in the run")
    parser.add_argument("--quick", action="store_true", help="the small size only, 3 repeats "
                                                             "(under a minute)")
    parser.add_argument("--out", help="results folder (default ./symfast-bench)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    for name, what in (("ops", "ops"), ("backends", "backends (reference, compile, cpu, triton)"),
                       ("dtypes", "dtypes (fp32, bf16)"), ("sizes", "sizes (small, readme, large)")):
        parser.add_argument(f"--{name}", type=_names, help=f"comma-separated {what} (default: all)")
    parser.add_argument("--repeats", type=int, help="timed repeats per case")
    return parser


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _bench_all(args: list[str]) -> int:
    from symfast.profiling.bench import bench_all, format_rows

    ns = _bench_all_parser().parse_args(args)
    result = bench_all(ns.out, quick=ns.quick, device=ns.device, ops=ns.ops, backends=ns.backends,
                       dtypes=ns.dtypes, sizes=ns.sizes, repeats=ns.repeats)
    print(format_rows(result["rows"]))
    lim = result["limits"].to_dict()
    print("limits measured in this run: " + ", ".join(f"{k} {v:.1f}" for k, v in lim.items()))
    print(f"wrote {result['csv']} and {len(result['plots'])} plot(s)")
    return 0


def _add_profile_flags(parser: argparse.ArgumentParser) -> None:
    """`symfast profile <job>`: each job's flags, as the job itself takes them."""
    jobs = parser.add_subparsers(dest="job", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--out", default="symfast-profile", help="folder for trace.json, "
                        "table.csv, profile.json, breakdown.png")
    common.add_argument("--device", default="cpu", help="cpu or cuda")
    p = jobs.add_parser("sample", parents=[common], help="sampling (default: the demo's model)")
    p.add_argument("--checkpoint", help="a checkpoint or run folder (default: the shipped demo "
                                        "model)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps")
    p.add_argument("--n", type=int, default=16, help="images")
    p.add_argument("--sampler", default="heun")
    p.add_argument("--group", help="frame-average over this group")
    p.add_argument("--ema", type=_optional(int), default=0)
    p.add_argument("--seed", type=int, default=0)
    p = jobs.add_parser("sfbd", parents=[common], help="SFBD's backward step (denoising noisy "
                                                       "digits; default: the demo's model)")
    p.add_argument("--checkpoint", help="a checkpoint or run folder (default: the demo model)")
    p.add_argument("--steps", type=int, default=4, help="denoised batches profiled")
    p.add_argument("--n", type=int, default=16, help="images per batch")
    p.add_argument("--tau", type=float, default=0.5, help="noise level of the observations")
    p.add_argument("--denoise-steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p = jobs.add_parser("train", parents=[common], help="training steps (default: a tiny WT "
                                                        "model on 8x8 digits)")
    p.add_argument("--steps", type=int, default=4, help="training steps profiled")
    _add_train_flags(p, skip={"steps", "out", "resume", "init_from", "checkpoint_every", "keep",
                              "log_every", "sample_every", "sample_n", "sample_steps", "progress"})
    p = jobs.add_parser("op", parents=[common], help="one op (symfast bench all's case)")
    p.add_argument("op", help="an op of symfast.ops, e.g. orbit_mean")
    p.add_argument("--size", default="small", help="small, readme or large")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--backend", help="reference, compile, cpu or triton (default: the fastest)")
    p.add_argument("--steps", type=int, default=10, help="calls profiled")


def _profile(ns: argparse.Namespace) -> int:
    from symfast.profiling.trace import format_report, profile

    options = {k: v for k, v in vars(ns).items() if k not in ("command", "job", "out")}
    report = profile(ns.job, ns.out, **options)
    print(format_report(report))
    print(f"wrote {', '.join(report.files.values())} in {ns.out}")
    return 0


def bench(name: str, args: list[str]) -> int:
    script = _REPO / "benchmarks" / BENCHMARKS[name]
    if not script.exists():
        print(f"benchmark script {script} not found: benchmarks ship with the source tree "
              f"(pip install -e . from a checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))  # as `python benchmarks/<script>` would
    # and as there, the scripts' `import _common` must find benchmarks/_common.py, not a module
    # of that name imported before in this process (experiments/ has one too)
    common = sys.modules.get("_common")
    if common is not None and Path(getattr(common, "__file__", "") or "").parent != script.parent:
        del sys.modules["_common"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


TRAIN_HELP = {
    "data": "digits, digits-d4 (every digit under D4), gmm-d4 (exact-score Gaussian mixture) or "
            "a folder of PNG/JPEG images",
    "image_size": "images are resized to N x N",
    "data_channels": "image channels (1 or 3; digits: 1, folders: 3)",
    "dataset_size": "images drawn from gmm-d4",
    "model": "unet, equivariant-unet or diffusers-unet (default: equivariant-unet for wt)",
    "channels": "UNet widths per level, e.g. 32,64,64",
    "attention_levels": "levels with self-attention, e.g. 1,2 (default: the lowest)",
    "group": "symmetry group (default d4 when --equivariance is not none)",
    "equivariance": "none, augment, wt (weight tying), fa (frame averaging) or reg (regulariser)",
    "fa_train": "with fa: frame-average in training too (|G| network calls per step)",
    "reg_weight": "lambda of the equivariance regulariser (reg)",
    "prediction": "edm (EDM preconditioning), eps, v or x0 (DDPM schedule)",
    "batch_size": "global batch, split over the torchrun ranks",
    "lr_schedule": "constant, cosine or inverse-sqrt, after --warmup-steps",
    "grad_clip": "clip the gradient norm to C ('none' to disable)",
    "max_nonfinite": "stop after this many consecutive non-finite steps",
    "ema_halflife_images": "EMA half-life(s) in images, e.g. 500000 or 10000,50000",
    "ema_rampup": "EMA ramp-up ratio ('none' to disable)",
    "precision": "fp32 or bf16 (autocast)",
    "compile": "run the network under torch.compile",
    "checkpoint_every": "steps between checkpoints",
    "keep": "checkpoints kept",
    "resume": "auto (newest valid checkpoint in --out), none, or a checkpoint/run path",
    "init_from": "start from this checkpoint's EMA weights (fine-tuning; fresh optimiser and EMA)",
    "sample_every": "steps between sample grids in OUT/samples (0: never)",
    "out": "run folder: checkpoints/, metrics.csv, config.json, samples/",
    "heads": "attention heads",
    "sigma_data": "standard deviation of the data (EDM preconditioning)",
    "p_mean": "mean of log sigma in training (EDM)",
    "p_std": "standard deviation of log sigma in training (EDM)",
    "steps": "optimiser steps in all (a resumed run goes on to this step)",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW's decoupled weight decay",
    "adam_betas": "AdamW's beta1,beta2",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "seed": "seed of the data order, noise and initial weights",
    "sample_n": "images per sample grid",
    "sample_steps": "Heun sampler steps per sample grid",
    "log_every": "steps per metrics.csv row",
    "progress": "show a progress bar",
}


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    return parse


def _with_default(text: str | None, default) -> str | None:
    """``text`` and TrainConfig's default (the flag's own default is SUPPRESS, so that only the
    flags given override --config: argparse's formatter would show nothing)."""
    if default is None:  # the help says what None means
        return text
    shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
    return f"{text + ' ' if text else ''}(default: {shown})".replace("%", "%%")


def _add_train_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset(),
                     show_defaults: bool = False) -> None:
    """One flag per TrainConfig field (but ``skip``); only the flags given override --config.
    ``show_defaults``: each help says TrainConfig's default (where the command's are those)."""
    from symfast.train.config import TrainConfig

    parser.add_argument("--config", help="JSON or TOML file of config fields (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra" or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = TRAIN_HELP.get(f.name)
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS,
                  "help": _with_default(text, default) if show_defaults else text}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if isinstance(default, (tuple, list)) or f.name == "attention_levels":
            kind = str  # comma-separated, parsed by TrainConfig
        elif f.name in ("grad_clip", "ema_rampup"):
            kind = _optional(float)
        elif f.name == "data_channels":
            kind = int
        else:
            kind = type(default) if default is not None else str
        parser.add_argument(flag, type=kind, **kwargs)


SFBD_HELP = {
    "tau": "noise level of the observations y = x + tau * eps",
    "clean_fraction": "share of the images seen clean (the rest only noisy)",
    "rounds": "backward/forward rounds (online: rounds x steps-per-round training steps)",
    "pretrain_steps": "training steps on the clean images",
    "steps_per_round": "fine-tuning steps per round",
    "denoise_steps": "steps of the EDM grid the backward step's ODE is cut from (at tau)",
    "denoise_sampler": "sampler of the backward step (heun: EDM's PF-ODE solver)",
    "denoise_batch": "images per network batch in the backward step",
    "shard_size": "denoised images per shard file",
    "merge_clean": "train each round on the denoised images and the clean ones",
    "mode": "rounds, or online (refresh part of the denoised set during training)",
    "refresh_every": "online: steps between refreshes",
    "refresh_fraction": "online: share of the denoised set refreshed each time (round(f*N) images, "
                        "the next ones of a seeded permutation)",
    "ramp_steps": "online: steps over which the denoised images' loss weight ramps to 1",
    "data_seed": "seed of the clean/noisy split and of the observation noise",
    "fd_samples": "after each stage, the Frechet distance of this many samples to the clean images "
                  "(digit features for --data digits, pixels otherwise) in its summary; "
                  "0: none",
    "out": "output folder: pretrain/, round-K/ (or online/), sfbd.json",
    "progress": "progress bars and a summary line per stage",
}


def _add_sfbd_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SFBDConfig field, then the training flags not already taken."""
    from symfast.train.sfbd import SFBDConfig

    taken = set()
    for f in dataclasses.fields(SFBDConfig):
        if f.name == "train":
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": SFBD_HELP.get(f.name)}
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=type(f.default), **kwargs)
        taken.add(f.name)
    # (no defaults shown: each stage sets its own EMA half-life and ramp-up)
    _add_train_flags(parser, skip=taken | {"steps", "init_from", "resume"})


def _sfbd(ns: argparse.Namespace) -> int:
    from symfast.train.sfbd import run

    values = {k: v for k, v in vars(ns).items() if k not in ("command", "config")}
    result = run(ns.config, **values)
    if result.rank == 0:
        print(f"SFBD finished: {len(result.summaries) - 1} stage(s) after pretraining; final "
              f"checkpoint: {result.checkpoint}")
    return 0


def _train(ns: argparse.Namespace) -> int:
    from symfast.train import train

    values = {k: v for k, v in vars(ns).items() if k not in ("command", "config")}
    result = train(ns.config, **values)
    if result.rank == 0:
        print(f"trained to step {result.step} ({result.nimg} images); checkpoint: {result.checkpoint}")
    return 0


def _checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder")
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--group", help="frame-average over this group at sampling")
    parser.add_argument("--ema", type=_optional(int), default=0,
                        help="EMA copy index, or 'none' for the raw trained weights")
    parser.add_argument("--device", default="cpu")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("symfast").setLevel(logging.INFO)
    parser = _Parser(prog="symfast", description="symfast command line")
    sub = parser.add_subparsers(dest="command", required=True)
    # The flags of train, sfbd and profile come from config dataclasses that import torch: they
    # are built only for the command being run, so `symfast --help` (and a typo) answer at once.
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)

    def flags(name: str, add, sub_parser: argparse.ArgumentParser) -> None:
        if command == name:
            add(sub_parser)
    sub.add_parser("info", help="version, torch, and which backends are available (and why not)")
    bench_parser = sub.add_parser("bench", help="run a benchmark script (args are passed on)")
    # nargs="?" and a check below: argparse would list the optional args as missing too
    bench_parser.add_argument("name", nargs="?", choices=sorted(BENCHMARKS) + ["all"],
                              help="a benchmark script, or all (symfast bench all --help)")
    bench_parser.add_argument("args", nargs=argparse.REMAINDER)
    train_parser = sub.add_parser("train", help="train a diffusion model (torchrun -m symfast "
                                                "train ... for DDP)")
    flags("train", lambda parser: _add_train_flags(parser, show_defaults=True), train_parser)
    sfbd_parser = sub.add_parser("sfbd", help="SFBD: train from noisy images and a few clean ones "
                                              "(torchrun -m symfast sfbd ... to scale out)")
    flags("sfbd", _add_sfbd_flags, sfbd_parser)
    sample_parser = sub.add_parser("sample", help="sample a grid of images from a checkpoint")
    _checkpoint_flags(sample_parser)
    sample_parser.add_argument("--n", type=int, default=64)
    sample_parser.add_argument("--seed", type=int, default=0)
    sample_parser.add_argument("--out", required=True, help="the PNG grid to write")
    denoise_parser = sub.add_parser(
        "denoise", help="denoise an image with a checkpoint's model (equivariant for wt/fa runs with "
                        "a deterministic sampler: heun, euler, ddim, dpmpp_2m; a stochastic one draws "
                        "noise that does not turn with the image)")
    _checkpoint_flags(denoise_parser)
    denoise_parser.add_argument("--sigma", type=float, required=True, help="the image's noise level")
    denoise_parser.add_argument("--add-noise", type=int, metavar="SEED",
                                help="first add noise of std sigma to the (clean) input")
    denoise_parser.add_argument("input")
    denoise_parser.add_argument("output")
    export_parser = sub.add_parser("export", help="write a run's sampling weights (one EMA copy) "
                                                  "as a small checkpoint that load() and demo read")
    export_parser.add_argument("checkpoint", help="a checkpoint folder or a run folder")
    export_parser.add_argument("out", help="the folder to write")
    export_parser.add_argument("--ema", type=int, default=0, help="which EMA copy (index)")
    profile_parser = sub.add_parser("profile", help="a few steps of a job under torch.profiler: "
                                    "where the time goes, a Chrome trace, tables and a plot")
    flags("profile", _add_profile_flags, profile_parser)
    demo_parser = sub.add_parser("demo", help="sample and denoise digits with the shipped "
                                              "equivariant model (seconds, offline)")
    demo_parser.add_argument("--out", default="symfast-demo", help="folder for the PNGs and summary")
    demo_parser.add_argument("--checkpoint", help="another checkpoint (default: the shipped one)")
    demo_parser.add_argument("--n", type=int, default=64, help="digits to sample")
    demo_parser.add_argument("--steps", type=int, default=18)
    demo_parser.add_argument("--sigma", type=float, default=0.5, help="noise level to denoise")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--device", default="cpu")
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # answered by the command's parser, whose --help lists what it takes
        sub.choices[ns.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if ns.command == "bench" and ns.name is None:
        bench_parser.error(f"the following argument is required: name (one of "
                           f"{', '.join(sorted(BENCHMARKS) + ['all'])})")
    if ns.command == "info":
        return info()
    if ns.command == "bench" and ns.name != "all":
        return bench(ns.name, ns.args)
    try:
        return _run_job(ns)
    except (ValueError, TypeError) as exc:  # bad input: the message names the argument
        print(f"symfast {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from symfast.train.loop import TrainingDiverged
        if not isinstance(exc, TrainingDiverged):
            raise
        print(f"symfast {ns.command}: {exc}", file=sys.stderr)  # names the last good checkpoint
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: checkpoints are written atomically, so what is there is whole; say how to go
        # on instead of a traceback through the loop. 130: a shell's code for a SIGINT.
        print(f"symfast {ns.command}: interrupted{INTERRUPTED.get(ns.command, '')}", file=sys.stderr)
        return 130


INTERRUPTED = {
    "train": "; to continue from its newest checkpoint, run the command again with the same "
             "--out (--resume auto, the default)",
    "sfbd": "; to continue, run the command again with the same --out (finished stages and "
            "checkpoints are kept)",
}


def _run_job(ns: argparse.Namespace) -> int:
    if ns.command == "bench":
        return _bench_all(ns.args)
    if ns.command == "profile":
        return _profile(ns)
    if ns.command == "train":
        return _train(ns)
    if ns.command == "sfbd":
        return _sfbd(ns)
    if ns.command == "sample":
        from symfast.train import sample_to_file
        sample_to_file(ns.checkpoint, ns.out, n=ns.n, sampler=ns.sampler, steps=ns.steps,
                       seed=ns.seed, group=ns.group, ema=ns.ema, device=ns.device)
        print(f"wrote {ns.out}")
        return 0
    if ns.command == "denoise":
        from symfast.train import denoise_file
        denoise_file(ns.checkpoint, ns.input, ns.output, ns.sigma, add_noise=ns.add_noise,
                     sampler=ns.sampler, steps=ns.steps, group=ns.group, ema=ns.ema,
                     device=ns.device)
        print(f"wrote {ns.output}")
        return 0
    if ns.command == "export":
        from symfast.train import export
        print(f"wrote {export(ns.checkpoint, ns.out, ema=ns.ema)}")
        return 0
    if ns.command == "demo":
        from symfast import demo
        summary = demo.run(ns.out, checkpoint=ns.checkpoint, n=ns.n, steps=ns.steps,
                           sigma=ns.sigma, seed=ns.seed, device=ns.device)
        print(demo.format_summary(summary, ns.out))
        return 0
    raise AssertionError(ns.command)


if __name__ == "__main__":
    raise SystemExit(main())
