"""symfast.profiling: the timing helper on a fake clock, the ops' bytes/flops models against hand
counts, the profile's split into categories, `symfast profile {sample,train,op}` and
`symfast bench all` on tiny selections, and bad input. No test asserts a timing."""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from symfast import _backend
from symfast.cli import main
from symfast.ops import orbit
from symfast.profiling import costs, timing
from symfast.profiling.bench import COLUMNS, available_backends, bench_all
from symfast.profiling.trace import CATEGORIES, split_events

FILES = ("trace.json", "table.csv", "profile.json", "breakdown.png")


# ---- timing -------------------------------------------------------------------------------------

def fake_clock(durations):
    """A clock whose successive (start, stop) readings are ``durations`` apart."""
    ticks = itertools.accumulate(itertools.chain.from_iterable((0.0, d) for d in durations))
    return lambda: next(ticks)


def test_measure_times_only_the_repeats_and_reports_median_and_quantiles():
    calls = []
    t = timing.measure(lambda: calls.append(1), repeats=5, warmup=2,
                       clock=fake_clock([4.0, 1.0, 3.0, 2.0, 5.0]))
    assert len(calls) == 7  # warm-up calls run, untimed
    assert t.times == (4.0, 1.0, 3.0, 2.0, 5.0)
    assert t.median == 3.0
    assert t.quantile(0.25) == 2.0 and t.quantile(0.1) == pytest.approx(1.4)
    assert t.summary()["q90_s"] == pytest.approx(4.6) and t.summary()["repeats"] == 5
    assert t.spread == pytest.approx((4.0 - 2.0) / 3.0)


def test_quantile_interpolates_between_order_statistics():
    assert timing.quantile([10, 0, 20, 30], 0.5) == 15
    assert timing.quantile([10, 0, 20, 30], 1 / 3) == pytest.approx(10)
    assert timing.quantile([7], 0.9) == 7
    with pytest.raises(ValueError, match="q must be"):
        timing.quantile([1, 2], 1.5)
    with pytest.raises(ValueError, match="values"):
        timing.quantile([], 0.5)


@pytest.mark.parametrize("kwargs, name", [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"),
                                          ({"repeats": 2.5}, "repeats")])
def test_measure_rejects_bad_counts(kwargs, name):
    with pytest.raises(ValueError, match=name):
        timing.measure(lambda: None, **kwargs)


def test_paired_ratio_is_the_median_of_adjacent_ratios():
    # per repeat the clock is read before base, between, after fn: ratios 2/1, 4/1, 6/2
    ticks = iter([0.0, 2.0, 3.0, 3.0, 7.0, 8.0, 8.0, 14.0, 16.0])
    ratio = timing.paired_ratio(lambda: None, lambda: None, 3, clock=lambda: next(ticks))
    assert ratio == 3.0


# ---- roofline models ----------------------------------------------------------------------------

def test_cost_models_match_hand_counts():
    x = torch.zeros(2, 3, 4, 4)  # 96 fp32 values
    # orbit under D4: x read once, 8 copies written
    assert costs.call_cost("orbit", (x, "d4"), {}).bytes == (1 + 8) * 96 * 4
    y = torch.zeros(16, 3, 4, 4, dtype=torch.bfloat16)  # 8 blocks of 96
    assert costs.call_cost("orbit_mean", (y, "d4"), {}).bytes == (8 * 96 + 96) * 2
    # tied 3x3 D4 conv, 4 -> 6 channels on 8x8 with padding 1: R = 3 orbit values per (O, C)
    xc, w = torch.zeros(2, 4, 8, 8), torch.zeros(6, 4, 3)
    conv = costs.call_cost("tied_conv2d", (xc, w, None, 3, "d4", 1, 1), {})
    assert conv.flops == 2 * 2 * 6 * 4 * 3 * 8 * 8
    assert conv.bytes == 4 * (2 * 4 * 64 + 6 * 4 * 3 + 2 * 6 * 64)
    # classifier_select: B=5, F=7, K=2, C=3 -> one GEMM against K + K*C = 8 rows
    sel = costs.call_cost("classifier_select", (torch.zeros(5, 7), torch.zeros(2, 7), torch.zeros(2),
                                                torch.zeros(2, 3, 7), torch.zeros(2, 3)), {})
    assert sel.flops == 2 * 5 * 7 * 8 and sel.bound == "memory"
    # attention_pool: only the rows of positions below each length are read when padding is
    # masked (B*L of them were counted); d = 3, d_k = 5, lengths 2 and 4 of L = 4
    tokens, lengths = torch.zeros(2, 4, dtype=torch.int64), torch.tensor([2, 4])
    pool = (tokens, lengths, torch.zeros(7, 3), torch.zeros(7, 5), torch.zeros(5))
    ids = 8 * (8 + 2)
    assert costs.call_cost("attention_pool", pool, {}).bytes == ids + 4 * (6 * (3 + 5) + 2 * 3)
    assert costs.call_cost("attention_pool", pool, {"mask_padding": False}).bytes == \
        ids + 4 * (8 * (3 + 5) + 2 * 3)
    assert costs.call_cost("not_an_op", (x,), {}) is None
    assert costs.call_cost("orbit", (), {}) is None  # arguments that do not bind


def test_floor_is_the_larger_of_the_memory_and_compute_floors():
    limits = timing.MachineLimits(1e9, {"fp32": 1e10, "bf16": 5e9})
    assert limits.floor_seconds(2e9, 1e9, "fp32") == 2.0
    assert limits.floor_seconds(1e9, 3e10, "fp32") == 3.0
    # bf16 slower than fp32 (a CPU without bf16 arithmetic): fp32's roof applies
    assert limits.floor_seconds(0.0, 3e10, "bf16") == 3.0
    # fp64 has its own roof (fp32's understated fp64 ops' floors)
    assert timing.MachineLimits(1e9, {"fp32": 1e10, "fp64": 5e9}).floor_seconds(0.0, 1e10, "fp64") == 2.0
    best = limits.best_of(timing.MachineLimits(2e9, {"fp32": 5e9, "fp16": 1e11}))
    assert best.copy_bytes_per_s == 2e9
    assert best.gemm_flops_per_s == {"fp32": 1e10, "bf16": 5e9, "fp16": 1e11}



def test_op_calls_sum_costs_per_op_and_keep_the_dtype():
    from symfast.profiling.trace import OpCalls

    calls = OpCalls()
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float16)  # 32 values
    calls("orbit", (x, "d4"), {})
    calls("orbit", (x, "c4"), {"backend": "reference"})
    calls("orbit", (), {})  # arguments that do not bind: counted, no cost
    assert calls.calls == {"orbit": 3} and calls.dtype == {"orbit": "fp16"}
    assert calls.cost["orbit"].bytes == (9 + 5) * 32 * 2

def test_ops_report_their_calls_only_under_a_profiler(monkeypatch):
    seen = []
    monkeypatch.setattr(_backend, "op_call_sink", lambda op, args, kwargs: seen.append(op))
    x = torch.randn(2, 1, 4, 4)
    orbit(x, "d4", backend="reference")
    assert seen == []
    with torch.profiler.profile() as prof:
        orbit(x, "d4", backend="reference")
    assert seen == ["orbit"]
    assert any(e.name == "symfast.orbit" for e in prof.events())


# ---- the split into categories ------------------------------------------------------------------

def _event(name, own_us, children=(), thread=1):
    e = SimpleNamespace(name=name, self_cpu_time_total=own_us, self_device_time_total=0.0,
                        cpu_children=list(children), cpu_parent=None, thread=thread)
    for c in children:
        c.cpu_parent = e
    e.cpu_time_total = own_us + sum(c.cpu_time_total for c in children)
    return e


def test_split_attributes_own_time_to_the_innermost_category_and_fills_the_rest():
    conv = _event("symfast::tied_conv2d_cpu", 300)
    tied = _event("symfast.tied_conv2d", 100, [conv])
    net = _event("symfast.profile.network", 50, [tied, _event("aten::silu", 150)])
    opt = _event("Optimizer.step#AdamW.step", 80, [_event("aten::_fused_adamw_", 20)])
    data = _event("symfast.profile.data", 40)
    loose = _event("aten::add", 10)
    # a compiled network: its region is network time, a custom op inside it a symfast op
    gns = _event("symfast::group_norm_silu", 20)
    compiled = _event("Torch-Compiled Region: 0/0", 30, [gns])
    steps = _event("symfast.profile.steps", 5, [net, opt, data, loose, compiled])
    other_thread = _event("aten::mul", 10_000, thread=2)  # overlaps the main thread's time
    events = [steps, net, tied, conv, opt, data, loose, compiled, gns, other_thread]
    events += net.cpu_children[1:] + opt.cpu_children
    split = split_events(events, wall=1e-3)
    us = {k: round(v * 1e6) for k, v in split.categories.items()}
    # other: the steps range's own 5 us, the loose add's 10, and the 195 no event covers
    assert us == {"network layers": 230, "symfast ops": 420, "optimiser": 100,
                  "data loading": 40, "host overhead/other": 210}
    assert sum(split.categories.values()) == pytest.approx(split.wall)
    assert {k: round(v * 1e6) for k, v in split.ops.items()} == {
        "tied_conv2d": 400, "symfast::group_norm_silu": 20}
    assert split.op_events == {"tied_conv2d": 1, "symfast::group_norm_silu": 1}
    assert set(split.categories) == set(CATEGORIES)


# ---- the commands -------------------------------------------------------------------------------

def _shares(folder):
    report = json.loads((folder / "profile.json").read_text())
    return report, {r["category"]: r["share"] for r in report["categories"]}


def test_profile_sample_of_the_shipped_model_writes_every_file(tmp_path, capsys):
    out = tmp_path / "sample"
    assert main(["profile", "sample", "--steps", "2", "--n", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "network layers" in printed and "tied_conv2d" in printed
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    report, shares = _shares(out)
    assert set(shares) == set(CATEGORIES)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert shares["network layers"] > 0 and shares["symfast ops"] > 0
    ops = {r["op"]: r for r in report["ops"]}
    # the demo model is an EquivariantUNet of tied convolutions, sampled with the fused step
    assert ops["tied_conv2d"]["calls"] > 0 and ops["tied_conv2d"]["share_of_limit"] > 0
    assert "fused_step" in ops and report["steps"] == 2
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("name") == "symfast.tied_conv2d" for e in trace["traceEvents"])
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows if r["kind"] == "category"] == list(CATEGORIES)


def test_profile_train_tiny_run_splits_optimiser_and_data(tmp_path):
    out = tmp_path / "train"
    assert main(["profile", "train", "--steps", "1", "--channels", "8,8", "--batch-size", "4",
                 "--out", str(out)]) == 0
    report, shares = _shares(out)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    for category in ("network layers", "symfast ops", "optimiser", "data loading"):
        assert shares[category] > 0, category
    ops = {r["op"] for r in report["ops"]}
    assert {"tied_conv2d", "tied_conv2d.backward"} <= ops  # WT training: tied convs both ways
    assert not (out / "run" / "checkpoints").exists()
    # profiling again replaces the profile's own run, but never a folder it did not make
    assert main(["profile", "train", "--steps", "1", "--channels", "8,8", "--batch-size", "4",
                 "--out", str(out)]) == 0
    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "run" / "precious.ckpt").write_text("x")
    assert main(["profile", "train", "--steps", "1", "--out", str(mine)]) == 2
    assert (mine / "run" / "precious.ckpt").read_text() == "x"


def test_profile_train_reg_counts_the_target_network_as_network(tmp_path):
    """equivariance="reg" runs the frozen EMA copy as the regulariser's target: its forward ran
    outside the network range, so its convolutions went to "host overhead/other"."""
    out = tmp_path / "reg"
    assert main(["profile", "train", "--steps", "1", "--equivariance", "reg", "--model", "unet",
                 "--channels", "8,8", "--batch-size", "4", "--out", str(out)]) == 0
    events = [e for e in json.loads((out / "trace.json").read_text())["traceEvents"] if e.get("ph") == "X"]
    ranges = [(e["tid"], e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "symfast.profile.network"]
    convs = [e for e in events if e["name"] == "aten::conv2d"]
    assert len(ranges) == 2 and convs  # the network's forward and the target's
    for e in convs:
        assert any(tid == e["tid"] and a <= e["ts"] and e["ts"] + e["dur"] <= b for tid, a, b in ranges)


def test_profile_op_counts_exactly_the_profiled_calls(tmp_path):
    out = tmp_path / "op"
    assert main(["profile", "op", "orbit_mean", "--steps", "3", "--out", str(out)]) == 0
    report, shares = _shares(out)
    row = next(r for r in report["ops"] if r["op"] == "orbit_mean")
    assert row["calls"] == 3 and row["throughput_unit"] == "GB/s" and row["throughput"] > 0
    assert shares["symfast ops"] > 0
    # the throughput is the op's bytes over its median unprofiled call, not its profiled total
    # (the profiler's own cost made small ops read 2.5-4x slower than bench all timed them)
    from symfast.profiling import cases
    case = cases.make_case("orbit_mean", "small", torch.float32, torch.device("cpu"))
    per_call = costs.call_cost("orbit_mean", case.args, case.kwargs).bytes
    assert row["throughput"] == pytest.approx(per_call / (row["median_ms"] / 1e3) / 1e9, rel=1e-9)
    assert report["unprofiled_wall_s"] > 0


def test_a_profile_killed_while_writing_leaves_no_mix_of_two_runs(tmp_path):
    """Each file was atomic but the set was not: a run killed after table.csv kept the earlier
    run's profile.json, which listed both runs' files as one report."""
    import subprocess
    out = tmp_path / "prof"
    assert main(["profile", "op", "orbit", "--steps", "2", "--out", str(out)]) == 0
    killed = subprocess.run([sys.executable, "-c", """
import os, signal, sys
import symfast.profiling.trace as trace
trace._plot = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # after table.csv, before profile.json
from symfast.cli import main
main(sys.argv[1:])
""", "profile", "op", "orbit_mean", "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "profile.json").exists() and not (out / "breakdown.png").exists()
    assert "orbit_mean" in (out / "table.csv").read_text()  # what remains is the new run's

def test_bench_all_writes_the_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "all", "--ops", "orbit,classifier_select", "--backends", "reference,cpu",
                 "--dtypes", "fp32", "--sizes", "small", "--repeats", "2", "--out", str(out)]) == 0
    assert "orbit" in capsys.readouterr().out
    with open(out / "bench.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    for column in ("op", "backend", "dtype", "shape", "median_ms", "throughput", "share_of_limit",
                   "machine"):
        assert column in reader.fieldnames
    assert reader.fieldnames == COLUMNS
    assert {(r["op"], r["backend"]) for r in rows} == {
        (op, b) for op in ("orbit", "classifier_select") for b in ("reference", "cpu")}
    orbit_bytes = costs.orbit(torch.empty(8, 3, 32, 32), "d4").bytes  # the small case's input
    for r in rows:
        assert not r["error"] and float(r["median_ms"]) > 0
        assert "threads" in r["machine"] and "(" in r["machine"]  # CPU model (ISA)
        # the share is the roofline floor over the median time
        assert float(r["share_of_limit"]) == pytest.approx(
            float(r["floor_ms"]) / float(r["median_ms"]), rel=1e-4)
        if r["op"] == "orbit":
            assert float(r["bytes"]) == orbit_bytes
    assert {r["throughput_unit"] for r in rows if r["op"] == "orbit"} == {"GB/s"}
    assert (out / "plots" / "orbit.png").stat().st_size > 0
    assert "copy_GBps" in json.loads((out / "limits.json").read_text())["limits"]



def _benchmarks_module(name: str, registered_as: str):
    """benchmarks/<name>.py loaded by path (experiments/ has modules of the same names, and
    either may be imported already), registered under ``registered_as``."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(registered_as, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its own module up there
    spec.loader.exec_module(module)
    return module


def _readme_tables():
    return _benchmarks_module("readme_tables", "readme_tables")


def test_readme_table_is_spliced_between_the_markers(tmp_path):
    tables = _readme_tables()
    base = {"dtype": "fp32", "size": "readme", "shape": "64x3x64x64", "machine": "CPU (avx2), 2 threads",
            "bound": "memory", "throughput_unit": "GB/s"}
    rows = [dict(base, op="orbit", backend="reference", median_ms="6.0", throughput="4",
                 share_of_limit="0.2"),
            dict(base, op="orbit", backend="cpu", median_ms="2.0", throughput="12",
                 share_of_limit="0.6"),
            dict(base, op="orbit", backend="cpu", dtype="bf16", median_ms="9", throughput="1",
                 share_of_limit="0.1")]
    results = tmp_path / "bench.csv"
    with open(results, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tables.BEGIN}\nold table\n{tables.END}\nmiddle\n"
                      f"{tables.TARGETS_BEGIN}\nold targets\n{tables.TARGETS_END}\nrest\n")
    assert tables.main([str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "old targets" not in text and "| issue | measurement |" in text and "\nmiddle\n" in text
    assert "| orbit | 64x3x64x64 | 6 ms | 2 ms | 60% (memory; 12 GB/s) |" in text
    assert tables.main([str(results), "--readme", str(readme), "--check"]) == 0
    readme.write_text("no markers\n")
    assert tables.main([str(results), "--readme", str(readme)]) == 2
    assert readme.read_text() == "no markers\n"

def test_targets_table_reads_each_figure_with_its_machine_date_and_command(tmp_path):
    tables = _readme_tables()
    machine = {"cpu": "AMD EPYC", "core": "Zen 3", "isa": "avx2", "threads": 2}
    (tmp_path / "op.json").write_text(json.dumps({
        "machine": machine, "measured": "2026-11-30", "command": "python benchmarks/bench_op.py",
        "summary": {"cpu_vs_compile": 1.23}, "rows": [{"variant": "cpu", "share": 0.55}]}))
    targets = (tables.Target(16, "op vs compile", "op", lambda d: d["summary"]["cpu_vs_compile"], 1.1),
               tables.Target(16, "op share", "op",
                             lambda d: tables._row(d["rows"], variant="cpu")["share"], 0.6, unit="%"),
               tables.Target(13, "overhead", "op", lambda d: 0.005, 0.01, unit="%", at_most=True))
    text = tables.targets_table(tmp_path, targets)
    assert ("| 16 | op vs compile | 1.23× | ≥ 1.10× | yes | Zen 3 (avx2), 2 threads, 2026-11-30 | "
            "`python benchmarks/bench_op.py` |") in text
    assert "| 16 | op share | 55% | ≥ 60% | **no** |" in text
    assert "| 13 | overhead | 0.5% | ≤ 1.0% | yes |" in text
    with pytest.raises(KeyError):
        tables._row([{"variant": "cpu"}, {"variant": "cpu"}], variant="cpu")


def test_targets_table_has_a_row_per_machine_kind(tmp_path):
    """Results of two machine kinds (benchmarks/results/machines/<kind>/): a row for each, naming
    its machine; a kind without the file gives no row; a file no kind has is an error."""
    tables = _readme_tables()
    for kind, core, ratio in (("zen3-avx2", "Zen 3", 1.05), ("zen4-avx512", "Zen 4", 1.2)):
        folder = tmp_path / "machines" / kind
        folder.mkdir(parents=True)
        (folder / "op.json").write_text(json.dumps({
            "machine": {"core": core, "isa": kind.split("-")[1], "threads": 2},
            "measured": "2026-12-01", "summary": {"cpu_vs_compile": ratio}}))
    (tmp_path / "machines" / "zen5-avx512").mkdir()
    target = tables.Target(16, "op vs compile", "op", lambda d: d["summary"]["cpu_vs_compile"], 1.1)
    text = tables.targets_table(tmp_path, (target,))
    assert "| 16 | op vs compile | 1.05× | ≥ 1.10× | **no** | Zen 3 (avx2), 2 threads" in text
    assert "| 16 | op vs compile | 1.20× | ≥ 1.10× | yes | Zen 4 (avx512), 2 threads" in text
    assert text.count("\n| 16 |") == 2
    with pytest.raises(FileNotFoundError, match="other.json"):
        tables.targets_table(tmp_path, (dataclasses.replace(target, file="other"),))


def test_machine_kind_names_core_and_isa():
    machine_kind = _benchmarks_module("_common", "benchmarks_common").machine_kind
    assert machine_kind({"cpu": "AMD EPYC", "core": "Zen 4", "isa": "avx512"}) == "zen4-avx512"
    assert machine_kind({"cpu": "Intel(R) Xeon(R) Gold", "core": "unknown", "isa": "avx2"}) == \
        "intelrxeonrgold-avx2"


def test_a_partial_bench_run_leaves_the_committed_whole_run_alone(tmp_path, monkeypatch):
    # bench_group_average --quick measures one shape of the four: written over the committed run,
    # the README's tables lost the rows they read
    common = _benchmarks_module("_common", "benchmarks_common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    kind = common.machine_kind(common.machine_info())
    whole = common.write_results("op", {"rows": [1, 2, 3]})
    assert whole == tmp_path / "op.json" and (tmp_path / "machines" / kind / "op.json").exists()
    for path in (common.write_results("op", {"rows": [1]}, subset="quick"),
                 common.write_results("op", {"rows": [2]}, parts={"a"}, all_parts={"a", "b"})):
        assert path.parent == tmp_path and path.name.startswith("op.only-")
    for path in (tmp_path / "op.json", tmp_path / "machines" / kind / "op.json"):
        assert json.loads(path.read_text())["rows"] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["op.json", "op.only-a.json",
                                                               "op.only-quick.json"]


def test_every_readme_target_reads_from_the_committed_results():
    tables = _readme_tables()
    text = tables.targets_table()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(tables.TARGETS) >= 10 and len(rows) >= len(tables.TARGETS)
    for t in tables.TARGETS:  # every target has a row on some machine kind
        assert any(f"| {t.issue} | {t.label} |" in row for row in rows), t.label


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, names", [
    (["profile", "op", "nope"], "op='nope'"),
    (["profile", "sample", "--checkpoint", "/no/such/checkpoint"], "checkpoint="),
    (["profile", "op", "orbit", "--size", "huge"], "size='huge'"),
    (["profile", "op", "orbit", "--backend", "warp"], "backend='warp'"),
    (["profile", "train", "--steps", "0"], "steps"),
    (["profile", "sample", "--sampler", "foo"], "sampler='foo'"),
    (["profile", "sample", "--ema", "7"], "EMA copy 7"),
    (["profile", "sample", "--group", "d5"], "d5"),
    (["profile", "sfbd", "--n", "1000"], "n=1000"),
    (["bench", "all", "--ops", "orbit,nope"], "ops="),
    (["bench", "all", "--dtypes", "fp8"], "dtypes="),
])
def test_bad_input_is_a_one_line_error_naming_the_argument(argv, names, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_an_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for argv in (["bench", "all", "--quick", "--ops", "orbit"], ["profile", "op", "orbit"]):
        for out in ("afile", "afile/sub"):
            assert main([*argv, "--out", str(tmp_path / out)]) == 2
            err = capsys.readouterr().err
            assert "cannot be written" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error on a machine without CUDA")
@pytest.mark.parametrize("argv", [["profile", "sample"], ["bench", "all"]])
def test_cuda_without_cuda_names_the_device(argv, tmp_path, capsys):
    assert main([*argv, "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    assert "device='cuda'" in capsys.readouterr().err


def test_unknown_job_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "nope"])
    assert exc.value.code == 2 and "argument job" in capsys.readouterr().err


def test_bench_all_refuses_a_backend_that_cannot_run_here(tmp_path):
    with pytest.raises(ValueError, match="backends=.*triton"):
        bench_all(tmp_path, backends=["triton"], device="cpu", progress=False)
    if "triton" not in available_backends(torch.device("cpu")):
        # all four named: triton was dropped without a word
        with pytest.raises(ValueError, match=r"\['triton'\] cannot run on cpu here"):
            bench_all(tmp_path, backends=["reference", "compile", "cpu", "triton"], device="cpu",
                      progress=False)


def test_timing_names_its_bad_arguments_before_any_work():
    calls = []
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but torch finds no CUDA device"):
            timing.measure(lambda: calls.append(1), device="cuda")
        assert not calls  # the warm-up calls ran first
    for nbytes in (0, 2, 6, 4.0):  # 2 bytes made no float32 element, and a bandwidth of it
        with pytest.raises(ValueError, match="nbytes must be a positive multiple of 4"):
            timing.copy_bandwidth(nbytes)
    for n in (0, -4, 2.5):
        with pytest.raises(ValueError, match="n must be a positive int"):
            timing.gemm_throughput(n)
    for dtypes in ("fp32", ("int8",)):  # a string was read letter by letter
        with pytest.raises(ValueError, match="dtypes must be a list of names"):
            timing.measure_limits(dtypes=dtypes)


def test_a_killed_writer_s_temporaries_are_removed_by_the_next_run(tmp_path):
    from symfast._io import atomic_write_text
    from symfast.demo import _writable_folder
    (tmp_path / ".trace.json.ylrkiwuq.tmp").write_text("")
    (tmp_path / ".trace.json.ylrkiwuq.tmp.tmp").write_text("partial")
    (tmp_path / ".mine.tmp").write_text("a user's own hidden file")
    atomic_write_text(tmp_path / "kept.txt", "x")
    _writable_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.tmp", "kept.txt"]
    with pytest.raises(ValueError, match="out must name a folder, got an empty string"):
        _writable_folder("")  # wrote into the working directory


def test_bench_all_replaces_an_earlier_run_s_files(tmp_path):
    """A killed bench left plots/.<op>.png.<8>.tmp, which the next run kept, and a run killed
    between its files left the new bench.csv beside the old limits.json."""
    plots = tmp_path / "plots"
    plots.mkdir()
    for name in ("orbit.png", ".orbit.png.abcd1234.tmp", "mine.txt"):
        (plots / name).write_text("earlier")
    bench_all(tmp_path, quick=True, ops=["orbit_mean"], backends=["cpu"], dtypes=["fp32"],
              repeats=1, progress=False)
    assert sorted(p.name for p in plots.iterdir()) == ["mine.txt", "orbit_mean.png"]


def test_profile_train_with_a_bad_argument_leaves_no_folder(tmp_path, capsys):
    assert main(["profile", "train", "--lr", "-1", "--out", str(tmp_path / "p")]) == 2
    assert "lr" in capsys.readouterr().err and not (tmp_path / "p").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bench_and_profile_time_the_triton_kernels(tmp_path):
    from symfast.profiling.trace import profile_op

    result = bench_all(tmp_path / "bench", device="cuda", ops=["orbit_mean", "tied_conv2d"],
                       dtypes=["fp32"], sizes=["small"], repeats=3, progress=False)
    rows = result["rows"]
    assert {r["backend"] for r in rows} == {"reference", "compile", "triton"}
    for r in rows:
        assert not r.get("error") and r["device"] == "cuda" and r["median_ms"] > 0
    report = profile_op(tmp_path / "op", "orbit_mean", backend="triton", device="cuda", steps=3)
    ops = {r["op"]: r for r in report.ops}
    assert ops["orbit_mean"]["calls"] == 3
    assert sum(r["share"] for r in report.categories) == pytest.approx(1.0, abs=1e-9)


def test_every_benchmark_script_answers_help_without_running(capsys, monkeypatch):
    """bench_attention and bench_classifier_select had no parser: --help started the benchmark
    (and wrote into benchmarks/results/)."""
    import sys

    from symfast.cli import BENCHMARKS, bench
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # bench() sets them as a script run would
    monkeypatch.setattr(sys, "path", list(sys.path))
    # another module named _common, imported first (experiments/ has one: the full suite's
    # experiment tests import it), must not shadow benchmarks/_common.py
    stale = type(sys)("_common")
    stale.__file__ = "/elsewhere/_common.py"
    monkeypatch.setitem(sys.modules, "_common", stale)
    for name in sorted(BENCHMARKS):
        assert bench(name, ["--help"]) == 0, name
        assert "usage:" in capsys.readouterr().out, name
    with pytest.raises(SystemExit):
        main(["bench"])
    assert "required: name (one of attention" in capsys.readouterr().err
