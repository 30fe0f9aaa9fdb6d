"""The `symfast train / sample / denoise` commands: flags and config files become one config,
a checkpoint becomes PNGs, bad input becomes a one-line error and exit code 2."""
from __future__ import annotations

import json

import pytest
import torch

from _train_util import DIGITS as FLAGS
from conftest import rel_err
from symfast.cli import main
from symfast.data.images import digits, read_image, save_image_grid
from symfast.groups import get
from symfast.train import denoise_file, make_config


@pytest.fixture(scope="module")
def wt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wt")
    assert main(["train", *FLAGS, "--equivariance", "wt", "--steps", "3", "--out", str(out)]) == 0
    return out


def test_config_file_with_flags_laid_over_it(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[train]\nsteps = 2\nlr = 0.0005\nchannels = [8, 16]\nheads = 2\n'
                      'ema_halflife_images = [100, 400]\ngrad_clip = 2.0\nimage_size = 8\n')
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--lr", "0.001", "--grad-clip", "none",
                 "--batch-size", "4", "--no-progress", "--out", str(out)])
    assert code == 0 and "trained to step 2" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 2 and saved["lr"] == 0.001 and saved["grad_clip"] is None
    assert saved["channels"] == [8, 16] and saved["ema_halflife_images"] == [100.0, 400.0]
    assert saved["batch_size"] == 4
    assert (out / "metrics.csv").is_file() and (out / "checkpoints" / "step-000000002").is_dir()


@pytest.mark.parametrize("name,text", [
    ("above.toml", 'out = "runs/mine"\nbatch_size = 4\nstepz = 3\n\n[train]\nsteps = 2\n'),
    ("beside.json", json.dumps({"train": {"steps": 2}, "batch_size": 4, "stepz": 3, "out": "x"})),
])
def test_a_key_outside_the_train_table_is_refused_naming_it(tmp_path, capsys, monkeypatch, name, text):
    # in TOML a key above [train] is top-level: it was dropped, silently, with every other one
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(text)
    assert main(["train", "--config", name, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "['batch_size', 'out', 'stepz']" in err and "[train]" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_config_file_with_train_and_sfbd_tables_trains_on_its_train_table(tmp_path):
    # the file symfast sfbd reads ([sfbd] beside [train]) stays one symfast train reads
    config = tmp_path / "both.toml"
    config.write_text('[sfbd]\ntau = 0.25\nrounds = 3\n[train]\nbatch_size = 16\nlr = 1e-3\n')
    cfg = make_config(config)
    assert (cfg.batch_size, cfg.lr) == (16, 1e-3)


def test_resuming_with_fewer_steps_than_trained_says_so_and_keeps_the_config(tmp_path, caplog):
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--steps", "3", "--out", str(out)]) == 0
    before = (out / "config.json").read_text()
    with caplog.at_level("WARNING", logger="symfast.train"):
        assert main(["train", *FLAGS, "--steps", "2", "--out", str(out)]) == 0
    assert "already at step 3, past steps=2: nothing trained" in caplog.text
    assert (out / "config.json").read_text() == before
    assert json.loads(before)["steps"] == 3


def test_sample_writes_a_grid(wt_run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(wt_run), "--n", "4", "--steps", "3",
                 "--out", str(out)]) == 0
    grid = read_image(out, channels=1)
    assert grid.shape == (1, 2 * 8 + 3, 2 * 8 + 3)  # 2x2 images, 1 pixel of padding


def test_denoise_is_equivariant_for_an_equivariant_model(wt_run, tmp_path):
    image = digits(8).images[5]
    g = get("d4")
    noisy = (image + 0.3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    save_image_grid(noisy, tmp_path / "y.png", padding=0)
    save_image_grid(g.act(noisy, 3), tmp_path / "gy.png", padding=0)
    assert main(["denoise", "--checkpoint", str(wt_run), "--sigma", "0.3", "--steps", "4",
                 str(tmp_path / "y.png"), str(tmp_path / "out.png")]) == 0
    assert read_image(tmp_path / "out.png").shape == (1, 8, 8)
    x = denoise_file(wt_run, tmp_path / "y.png", tmp_path / "a.png", 0.3, steps=4)
    gx = denoise_file(wt_run, tmp_path / "gy.png", tmp_path / "b.png", 0.3, steps=4)
    assert rel_err(gx, g.act(x, 3)) <= 1e-5


@pytest.mark.parametrize("argv,message", [
    (["train", *FLAGS, "--image-size", "10", "--channels", "8,16,16"], "image_size=10 cannot be pooled"),
    (["train", *FLAGS, "--resume", "/no/such/run"], "no such checkpoint"),
    (["train", *FLAGS, "--equivariance", "fa", "--group", "d5"], "unknown group name"),
    (["sample", "--checkpoint", "/no/such/run", "--out", "x.png"], "does not exist"),
    (["denoise", "--checkpoint", "/no/such/run", "--sigma", "0.5", "a.png", "b.png"], "does not exist"),
    # named the digits function's own argument (size)
    (["train", *FLAGS, "--image-size", "2"], "image_size must be >= 4 for data='digits', got 2"),
    # named a keyword train() does not take (model=)
    (["train", *FLAGS, "--model", "custom"], "train(network=...)"),
    # wrote the run into the current folder
    (["train", *FLAGS, "--steps", "1", "--out", ""], "out='' is empty"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_train_and_sfbd_name_an_out_that_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("mine")
    for argv in (["train", *FLAGS, "--steps", "1", "--out", "afile.txt"],
                 ["train", *FLAGS, "--steps", "1", "--out", "afile.txt/run"],
                 ["sfbd", "--out", "afile.txt"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "out='afile.txt" in err and "is a file" in err and "Traceback" not in err, err
    assert (tmp_path / "afile.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [["sfbd", "--steps", "5"], ["sample", "--checkpoint", "x", "--out", "g.png",
                                                             "--step", "2"]])
def test_an_abbreviated_option_is_not_taken_for_another(argv, capsys):
    # argparse took sfbd's --steps as --steps-per-round and sample's --step as --steps, silently
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unrecognized arguments" in err
    assert len(err.strip().splitlines()) == 1, err  # one line, not the usage first
    # pointed at the command's own flags (symfast --help lists only the commands)
    assert f"see symfast {argv[0]} --help" in err, err


@pytest.mark.parametrize("flags,message", [
    (["--equivariance", "none", "--reg-weight", "5"], "reg_weight=5.0 needs equivariance='reg'"),
    (["--dataset-size", "10"], "dataset_size=10 is the number of images drawn from data='gmm-d4'"),
])
def test_an_option_the_run_would_not_read_is_refused(flags, message, capsys, tmp_path):
    assert main(["train", *FLAGS, "--steps", "1", "--out", str(tmp_path / "r"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_diverged_run_ends_with_its_message_not_a_traceback(tmp_path, capsys):
    code = main(["train", *FLAGS, "--steps", "6", "--lr", "1e9", "--grad-clip", "none",
                 "--max-nonfinite", "2", "--checkpoint-every", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "symfast train:" in err and "last good checkpoint" in err, err


def test_ctrl_c_is_one_line_saying_how_to_continue_and_the_run_continues(tmp_path, capsys, monkeypatch):
    from symfast.train.loop import _Run
    real = _Run.iteration

    def interrupted_at_step_2(self):
        if self.step == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises wherever the loop is
        real(self)
    monkeypatch.setattr(_Run, "iteration", interrupted_at_step_2)
    argv = ["train", *FLAGS, "--steps", "3", "--checkpoint-every", "1", "--out", str(tmp_path / "r")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "symfast train: interrupted" in err and "--resume auto" in err and "same --out" in err, err
    monkeypatch.setattr(_Run, "iteration", real)
    assert main(argv) == 0
    assert "trained to step 3" in capsys.readouterr().out


def test_train_help_gives_every_flag_a_text_and_the_configs_default(capsys):
    import argparse
    import dataclasses

    from symfast.cli import _add_train_flags
    from symfast.train import TrainConfig
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: 0.0002)" in capsys.readouterr().out  # --lr's, from TrainConfig
    parser = argparse.ArgumentParser()
    _add_train_flags(parser, show_defaults=True)
    helps = {a.dest: a.help for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        assert helps[f.name], f"--{f.name} has no help"
        if f.default is not None:
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            assert helps[f.name].endswith(f"(default: {shown})"), (f.name, helps[f.name])


def test_sample_and_denoise_check_their_arguments_before_any_work(wt_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    common = ["--checkpoint", str(wt_run), "--n", "2", "--steps", "2"]
    for argv, message in [
        (["sample", *common, "--out", "grid/"], "out='grid/' must be the path of a .png file"),
        (["sample", *common, "--out", "folder"], "must be the path of a .png file"),
        (["sample", *common, "--out", "x.jpg"], "out='x.jpg' must be the path of a .png file"),
        (["sample", "--checkpoint", "a-file.txt", "--out", "x.png"], "is a file, not a checkpoint"),
        (["sample", *common, "--device", "cuda" if not torch.cuda.is_available() else "tpu",
          "--out", "x.png"], "device="),
        (["denoise", "--checkpoint", str(wt_run), "--sigma", "0.5", "a-file.txt", "out.jpeg"],
         "must be the path of a .png file"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file.txt", "folder"]


def test_denoise_refuses_an_image_of_another_size(wt_run, tmp_path, capsys):
    save_image_grid(torch.zeros(1, 12, 12), tmp_path / "big.png", padding=0)
    assert main(["denoise", "--checkpoint", str(wt_run), "--sigma", "0.3", str(tmp_path / "big.png"),
                 str(tmp_path / "out.png")]) == 2
    assert "12x12" in capsys.readouterr().err and not (tmp_path / "out.png").exists()
