"""The classifier experiments' --quick modes end to end (experiments/attention_dynamics.py and
experiments/cabcnn_audio.py), each in a subprocess on one thread, and what their JSON says."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symfast.models.cab_cnn import CABCNN, BaselineCNN, count_parameters

REPO = Path(__file__).resolve().parent.parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _run_quick(script: str, results: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "experiments" / f"{script}.py"), "--quick",
                           "--results", str(results)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if HAS_MATPLOTLIB:
        png = results / f"{script}_quick.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((results / f"{script}_quick.json").read_text())


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_attention_dynamics_quick(tmp_path):
    result = _run_quick("attention_dynamics", tmp_path)
    p = result["params"]
    assert result["command"] == "python experiments/attention_dynamics.py --quick"
    assert [row["head"] for row in result["table"]] == ["fc", "tc"]
    n_words = p["n_topics"] * p["words_per_topic"]
    want_steps = list(range(0, p["steps"] + 1, p["record_every"]))
    for row, run in zip(result["table"], result["runs"]):
        assert run["head"] == row["head"] and run["steps"] == want_steps
        score = torch.tensor(run["score"], dtype=torch.float64)
        norm = torch.tensor(run["norm"], dtype=torch.float64)
        attention = torch.tensor(run["attention"], dtype=torch.float64)
        assert score.shape == norm.shape == attention.shape == (len(want_steps), n_words)
        assert torch.isfinite(score).all() and torch.isfinite(norm).all()
        # the stored residual is the identity's, recomputed here from the stored s_t and ‖v_t‖
        lhs = run["query_norm_sq"] * (norm ** 2 - norm[0] ** 2)
        rhs = 2 * (score - score[0]) + (2 / p["m"]) * (score.exp() - score[0].exp())
        stored = torch.tensor([[math.nan if v is None else v for v in r] for r in run["residual"]],
                              dtype=torch.float64)
        checked = rhs.abs() >= p["min_rhs"]
        assert torch.equal(~stored.isnan(), checked)
        assert torch.allclose(stored[checked], ((lhs - rhs).abs() / rhs.abs())[checked],
                              rtol=1e-9, atol=0)
        assert checked[-1].all()  # by the end every topic word's score has moved
        assert row["residual_checked_fraction"] == pytest.approx(float(checked.double().mean()))
        assert row["residual_median"] == pytest.approx(float(stored[checked].median()))
        assert row["residual_max"] == pytest.approx(float(stored[checked].max()))
        # attention starts uniform over the m + 1 words and ends on the topic words
        assert torch.allclose(attention[0], torch.full((n_words,), 1 / (p["m"] + 1),
                                                       dtype=torch.float64), rtol=1e-4)
        assert row["final_topic_attention_mean"] == pytest.approx(float(attention[-1].mean()))
        assert row["final_topic_attention_mean"] > 3 / (p["m"] + 1)
        assert run["loss"][-1] < 0.5 * run["loss"][0]
        for key in ("train_accuracy", "test_accuracy"):
            assert 0.0 <= row[key] <= 1.0
        assert row["train_accuracy"] >= 0.95
        assert _finite(row["seconds"], run["query_norm_sq"]) and row["seconds"] > 0
    fc = result["table"][0]
    # FC under (near) gradient flow: the identity holds to a couple of percent at the quick size
    # (measured max 0.018 with lr = 1; a wrong ‖q‖², m or s_t would be off by O(1))
    assert fc["residual_max"] <= 0.05


def test_cabcnn_audio_quick(tmp_path):
    result = _run_quick("cabcnn_audio", tmp_path)
    p = result["params"]
    assert result["command"] == f"python experiments/cabcnn_audio.py --quick --seeds {p['seeds']}"
    assert p["seeds"] == 2
    rows = {row["model"]: row for row in result["table"]}
    assert list(rows) == ["CABCNN", "BaselineCNN"]
    n_classes = len(result["classes"])
    common = dict(n_mels=p["n_mels"], sample_rate=p["sample_rate"], channels=tuple(p["channels"]))
    fresh = {"CABCNN": CABCNN(n_classes, n_classifiers=p["n_classifiers"], **common),
             "BaselineCNN": BaselineCNN(n_classes, hidden=p["hidden"], **common)}
    for name, model in fresh.items():
        assert rows[name]["head_parameters"] == count_parameters(model.head)
        assert rows[name]["total_parameters"] == count_parameters(model)
    assert rows["CABCNN"]["head_parameters"] < rows["BaselineCNN"]["head_parameters"]
    runs = result["runs"]
    assert sorted((r["seed"], r["model"]) for r in runs) == sorted(
        (s, m) for s in range(p["seeds"]) for m in rows)
    for name, row in rows.items():
        mine = [r for r in runs if r["model"] == name]
        acc = [r["test_accuracy"] for r in mine]
        recalibrated = [r["test_accuracy_bn_recalibrated"] for r in mine]
        assert all(0.0 <= a <= 1.0 for a in acc + recalibrated + [r["train_accuracy"] for r in mine])
        # test accuracies are fractions of the test set: multiples of 1 / its size
        n_test = p["n_test_per_class"] * n_classes
        assert all(abs(a * n_test - round(a * n_test)) < 1e-9 for a in acc + recalibrated)
        assert row["test_accuracy_mean"] == pytest.approx(statistics.fmean(acc))
        assert row["test_accuracy_spread"] == pytest.approx(max(acc) - min(acc))
        assert row["test_accuracy_bn_recalibrated_mean"] == pytest.approx(statistics.fmean(recalibrated))
        assert row["test_accuracy_bn_recalibrated_spread"] == pytest.approx(
            max(recalibrated) - min(recalibrated))
        for r in mine:
            assert len(r["epoch_loss"]) == p["epochs"] and _finite(*r["epoch_loss"], r["seconds"])
            assert r["epoch_loss"][-1] < math.log(n_classes) + 0.5  # not diverging
    for r in (r for r in runs if r["model"] == "CABCNN"):
        assert len(r["gate_mean"]) == p["n_classifiers"]
        assert sum(r["gate_mean"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(r["gate_argmax_share"]) == pytest.approx(1.0, abs=1e-9)
        assert 1 / p["n_classifiers"] - 1e-6 <= r["gate_max_mean"] <= 1.0 + 1e-6


@pytest.mark.parametrize("script", ["attention_dynamics", "cabcnn_audio"])
def test_experiments_refuse_a_thread_count_below_one(script):
    """--threads 0 reached torch.set_num_threads: a traceback, not argparse's usage error."""
    done = subprocess.run([sys.executable, str(REPO / "experiments" / f"{script}.py"), "--threads", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "argument --threads: expected an int >= 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr
