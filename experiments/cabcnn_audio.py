"""CAB-CNN (arXiv 2006.09815) against the same network with one wider head, on symfast's seeded
synthetic audio: does the classifier-selection head (K linear classifiers mixed by a softmax gate)
match or beat a two-layer head with more parameters?

    python experiments/cabcnn_audio.py            # (~2 min) writes experiments/results/cabcnn_audio.{json,png}
    python experiments/cabcnn_audio.py --quick    # a few seconds (the test runs this)

Both models share the log-mel front end and the conv backbone (symfast.models.CABCNN with K = 4
classifiers, BaselineCNN with Linear(64, 128)-ReLU-Linear(128, 8)) and get the same budget: Adam
(lr 3e-3), batch 32, the same number of epochs over the same training clips. Training seed s sets
the initialisation (the two backbones start from the same weights for the same s, since the
backbone is built before the head) and the batch order; the data are fixed. The test clips are a
fresh draw (other frequencies, gains, onsets and noise). The background SNR is drawn from
U(-5, 10) dB, harder than synthetic_audio's default U(10, 30), where both models sit near 100%.
The table gives, per model, head and total parameter counts (count_parameters) and the test
accuracy's mean and spread (max - min) over seeds, evaluated the standard way (eval mode, with the
BatchNorm running averages kept during training) and again with the BatchNorm statistics
recomputed over the training clips under the final weights (the running averages mix in earlier
weights' statistics, which can cost a run several points); for CAB-CNN the JSON also says how the
gate spreads the test clips over its classifiers.

Runs on one thread by default (``--threads``): small convolutions gain nothing from a second
OpenMP thread, and on a shared 2-core machine its barrier waits cost more than the work (see
tests/test_cabcnn.py).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import positive_int, save_figure, write_json  # experiments/ is on sys.path
from symfast.data.audio import synthetic_audio
from symfast.models.cab_cnn import CABCNN, BaselineCNN, count_parameters

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("CABCNN", "BaselineCNN")

FULL = dict(n_train_per_class=96, n_test_per_class=128, train_data_seed=0, test_data_seed=1,
            sample_rate=8000, duration=0.5, snr_db=(-5.0, 10.0), n_mels=32, channels=(16, 32, 64),
            n_classifiers=4, hidden=128, epochs=15, batch_size=32, lr=3e-3, seeds=3)
QUICK = dict(FULL, n_train_per_class=16, n_test_per_class=8, duration=0.25, n_mels=16,
             channels=(8, 16), n_classifiers=3, hidden=32, epochs=5, batch_size=16, seeds=2)


def build(name: str, p: dict, n_classes: int):
    """A fresh model of kind ``name`` with the sizes in ``p``."""
    common = dict(n_mels=p["n_mels"], sample_rate=p["sample_rate"], channels=tuple(p["channels"]))
    if name == "CABCNN":
        return CABCNN(n_classes, n_classifiers=p["n_classifiers"], **common)
    if name == "BaselineCNN":
        return BaselineCNN(n_classes, hidden=p["hidden"], **common)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def _accuracy(model, clips) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(clips.waveforms).argmax(1) == clips.labels).double().mean())


def _recalibrated_bn(model, train, batch_size: int):
    """A copy of ``model`` whose BatchNorm running statistics are recomputed as the exact average
    over the training batches under the final weights (the running averages kept during training
    mix in statistics of earlier weights)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for index in torch.arange(len(train)).split(batch_size):
            model(train.waveforms[index])
    return model.eval()


def one_run(name: str, p: dict, train, test, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build(name, p, len(train.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=p["lr"])
    order_gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    for _ in range(p["epochs"]):
        model.train()
        total = 0.0
        for index in torch.randperm(len(train), generator=order_gen).split(p["batch_size"]):
            loss = F.cross_entropy(model(train.waveforms[index]), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / len(train))
    seconds = time.perf_counter() - t0
    run = {"model": name, "seed": seed, "epoch_loss": losses, "seconds": seconds,
           "test_accuracy": _accuracy(model, test), "train_accuracy": _accuracy(model, train),
           "test_accuracy_bn_recalibrated":
               _accuracy(_recalibrated_bn(model, train, p["batch_size"]), test),
           "head_parameters": count_parameters(model.head),
           "total_parameters": count_parameters(model)}
    if name == "CABCNN":
        with torch.no_grad():
            gates = model.head.gates(model.features(test.waveforms))  # (N, K), eval mode
        run["gate_mean"] = gates.mean(0).tolist()
        run["gate_argmax_share"] = (torch.bincount(gates.argmax(1), minlength=gates.shape[1])
                                    / gates.shape[0]).tolist()
        run["gate_max_mean"] = float(gates.max(1).values.mean())
    return run


def summarise(runs: list[dict]) -> list[dict]:
    """Table rows: per model, parameter counts and mean / spread (max - min) over seeds."""
    rows = []
    for name in MODELS:
        mine = [r for r in runs if r["model"] == name]
        acc = [r["test_accuracy"] for r in mine]
        recalibrated = [r["test_accuracy_bn_recalibrated"] for r in mine]
        rows.append({"model": name, "head_parameters": mine[0]["head_parameters"],
                     "total_parameters": mine[0]["total_parameters"], "seeds": len(mine),
                     "test_accuracy_mean": statistics.fmean(acc),
                     "test_accuracy_spread": max(acc) - min(acc),
                     "test_accuracy_min": min(acc), "test_accuracy_max": max(acc),
                     "test_accuracy_bn_recalibrated_mean": statistics.fmean(recalibrated),
                     "test_accuracy_bn_recalibrated_spread": max(recalibrated) - min(recalibrated),
                     "train_accuracy_mean": statistics.fmean(r["train_accuracy"] for r in mine),
                     "seconds_mean": statistics.fmean(r["seconds"] for r in mine)})
    return rows


def plot(rows: list[dict], runs: list[dict], p: dict, chance: float, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(rows))
    width = 0.38
    low, bars_all = 1.0, []
    for j, (key, label) in enumerate((("test_accuracy", "BN running statistics (standard eval)"),
                                      ("test_accuracy_bn_recalibrated", "BN recalibrated"))):
        accs = [[run[key] for run in runs if run["model"] == r["model"]] for r in rows]
        means = [statistics.fmean(a) for a in accs]
        errors = [[m - min(a) for m, a in zip(means, accs)],
                  [max(a) - m for m, a in zip(means, accs)]]
        offset = (j - 0.5) * width
        bars_all += axes[0].bar([i + offset for i in x], means, width, yerr=errors, capsize=4,
                                color=f"C{j}", alpha=0.75, label=label).patches
        for i, a in enumerate(accs):
            axes[0].plot([i + offset] * len(a), a, "k.", ms=5)
        low = min(low, *(min(a) for a in accs))
    bottom = max(0.0, low - 0.05)
    if chance > bottom:
        axes[0].axhline(chance, color="grey", ls=":", label="chance")
    axes[0].set_ylim(bottom, 1.0)
    for bar in bars_all:  # the mean, written at the bar's foot, clear of the error bars
        axes[0].text(bar.get_x() + bar.get_width() / 2, bottom + 0.01 * (1 - bottom),
                     f"{bar.get_height():.3f}", ha="center", va="bottom", fontsize=7)
    axes[0].legend(fontsize=7, loc="best")
    axes[0].set_ylabel(f"test accuracy (mean, min-max over {rows[0]['seeds']} seeds)")
    for offset, key, label in ((-width / 2, "head_parameters", "head"),
                               (width / 2, "total_parameters", "total")):
        bars = axes[1].bar([i + offset for i in x], [r[key] for r in rows], width, label=label)
        axes[1].bar_label(bars, fontsize=7)
    axes[1].set_ylabel("trainable parameters")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(list(x), [r["model"] for r in rows])
    fig.suptitle(f"CAB-CNN (K = {p['n_classifiers']}) vs one wider head (hidden {p['hidden']}), "
                 f"synthetic audio, {p['epochs']} epochs, "
                 f"SNR {p['snr_db'][0]:g} to {p['snr_db'][1]:g} dB",
                 fontsize=10)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None,
                        help="training seeds 0..seeds-1 (default 3, or 2 with --quick)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        p["seeds"] = args.seeds
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        audio = dict(sample_rate=p["sample_rate"], duration=p["duration"],
                     snr_db=tuple(p["snr_db"]))
        train = synthetic_audio(p["n_train_per_class"], seed=p["train_data_seed"], **audio)
        test = synthetic_audio(p["n_test_per_class"], seed=p["test_data_seed"], **audio)
        runs = []
        for seed in range(p["seeds"]):
            for name in MODELS:
                runs.append(one_run(name, p, train, test, seed))
                r = runs[-1]
                print(f"seed {seed} {name}: test accuracy {r['test_accuracy']:.4f} "
                      f"({r['test_accuracy_bn_recalibrated']:.4f} with BN recalibrated), train "
                      f"{r['train_accuracy']:.4f}, final loss {r['epoch_loss'][-1]:.4f} "
                      f"({r['seconds']:.1f} s)", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    rows = summarise(runs)
    print(f"\n{'model':12s} {'head params':>11s} {'total params':>12s} {'test acc':>16s} "
          f"{'test acc, BN recal.':>20s} {'train acc':>9s} {'s/run':>6s}")
    for r in rows:
        print(f"{r['model']:12s} {r['head_parameters']:11d} {r['total_parameters']:12d} "
              f"{r['test_accuracy_mean']:8.4f} ± {r['test_accuracy_spread'] / 2:.3f} "
              f"{r['test_accuracy_bn_recalibrated_mean']:12.4f} ± "
              f"{r['test_accuracy_bn_recalibrated_spread'] / 2:.3f} "
              f"{r['train_accuracy_mean']:9.4f} {r['seconds_mean']:6.1f}")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "cabcnn_audio_quick" if args.quick else "cabcnn_audio"
    command = ("python experiments/cabcnn_audio.py" + (" --quick" if args.quick else "")
               + f" --seeds {p['seeds']}"
               + (f" --threads {args.threads}" if args.threads != 1 else ""))
    write_json(results / f"{name}.json",
        {"command": command,
         "params": p,
         "threads": args.threads, "classes": train.classes, "table": rows, "runs": runs})
    png = plot(rows, runs, p, 1 / len(train.classes), results / f"{name}.png")
    print(f"wrote {results / (name + '.json')}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    sys.exit(main())
