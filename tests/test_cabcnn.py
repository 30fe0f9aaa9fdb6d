import math
import wave
import warnings

import pytest
import torch
from conftest import TOL, rel_err

from symfast.data.audio import (SYNTHETIC_CLASSES, load_wav_folder, read_wav, synthetic_audio,
                                write_wav)
from symfast.models.cab_cnn import (CABCNN, BaselineCNN, ClassifierSelect, LogMel, count_parameters,
                                    hz_to_mel, mel_filterbank, mel_to_hz)


@pytest.fixture
def one_thread():
    """Small convolutions gain nothing from a second OpenMP thread, and on a shared 2-core
    machine the barrier waits for a descheduled thread: measured 1.2 s (1 thread) vs 71 s
    (2 threads) for the same training run under load."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- mel front end ---------------------------------------------------------------------------

def test_mel_scale_round_trip_and_known_value():
    assert abs(float(hz_to_mel(1000.0)) - 999.985) < 1e-2  # HTK: 2595·log10(1 + 1000/700)
    f = torch.tensor([0.0, 440.0, 3999.0], dtype=torch.float64)
    assert rel_err(mel_to_hz(hz_to_mel(f)), f) <= 1e-12


def test_mel_filterbank_triangles_peak_at_their_centres():
    n_freqs, n_mels, sr = 129, 20, 8000
    fb = mel_filterbank(n_freqs, n_mels, sr)
    assert fb.shape == (n_freqs, n_mels) and (fb >= 0).all() and fb.max() <= 1
    freqs = torch.linspace(0, sr / 2, n_freqs, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(0, float(hz_to_mel(sr / 2)), n_mels + 2, dtype=torch.float64))
    for m in range(n_mels):
        support = torch.nonzero(fb[:, m]).flatten()
        assert freqs[support].min() > edges[m] and freqs[support].max() < edges[m + 2]
        peak = int(fb[:, m].argmax())
        assert abs(freqs[peak] - edges[m + 1]) <= sr / 2 / (n_freqs - 1)  # within one bin
    # interior frequencies are covered by two overlapping triangles summing to 1
    inside = (freqs > edges[1]) & (freqs < edges[-2])
    assert torch.allclose(fb[inside].sum(1).double(), torch.ones(int(inside.sum()), dtype=torch.float64),
                          atol=1e-6)
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(n_freqs, n_mels, sr, f_max=5000.0)


@pytest.mark.parametrize("n_fft", [255, 256, 101])
def test_logmel_filters_sit_at_the_transform_s_bin_frequencies(n_fft):
    """An odd n_fft's bins lie at k·sr/n_fft, the last below sr/2: the filters were placed as
    if the bins spanned 0..sr/2 (up to 0.06 off at n_fft = 255; user tryout)."""
    sr, n_mels = 8000, 24
    lm = LogMel(sr, n_fft=n_fft, n_mels=n_mels)
    freqs = torch.fft.rfftfreq(n_fft, 1 / sr, dtype=torch.float64)
    points = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(sr / 2)), n_mels + 2, dtype=torch.float64))
    lo, centre, hi = points[:-2], points[1:-1], points[2:]
    want = torch.clamp(torch.minimum((freqs[:, None] - lo) / (centre - lo),
                                     (hi - freqs[:, None]) / (hi - centre)), min=0.0)
    assert (lm.filterbank.double() - want).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="n_freqs=100 must be n_fft // 2 \\+ 1 = 129"):
        mel_filterbank(100, 8, sr, n_fft=256)
    for bad in (10.5, 0):  # a float reached torch.linspace's own error
        with pytest.raises(ValueError, match="n_mels must be a positive int"):
            mel_filterbank(129, bad, sr)


def test_mel_filterbank_warns_of_filters_that_catch_no_bin():
    with pytest.warns(UserWarning, match="6 of the 128 mel filters are all zero"):
        mel_filterbank(129, 128, 8000)
    with pytest.warns(UserWarning, match="n_mels=128 is too many"):
        LogMel(8000, n_fft=256, n_mels=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mel_filterbank(129, 32, 8000)


@pytest.mark.parametrize("n_fft, hop, t", [(256, 128, 1000), (255, 128, 1024), (101, 50, 1000)])
def test_logmel_empty_batch_has_the_frames_of_a_full_one(n_fft, hop, t):
    frontend = LogMel(8000, n_fft=n_fft, hop_length=hop, n_mels=8)
    assert frontend(torch.zeros(0, t)).shape == (0,) + frontend(torch.randn(2, t)).shape[1:]


def test_logmel_finds_a_tone_and_ignores_gain():
    sr, n_mels = 8000, 32
    frontend = LogMel(sr, n_fft=256, hop_length=128, n_mels=n_mels)
    t = torch.arange(4000, dtype=torch.float64) / sr
    edges = mel_to_hz(torch.linspace(0, float(hz_to_mel(sr / 2)), n_mels + 2, dtype=torch.float64))
    for band in (5, 17, 26):
        tone = torch.sin(2 * math.pi * float(edges[band + 1]) * t)[None]
        spec = frontend(torch.cat([tone, 0.01 * tone]))
        assert spec.shape == (2, 1, n_mels, 4000 // 128 + 1)
        assert int(spec[0, 0].mean(-1).argmax()) == band
        # in fp64, since near-silent bands hold fp32 FFT round-off of ~1e-7 of the tone
        assert rel_err(spec[1], spec[0]) <= 1e-12  # unit-RMS scaling removes the gain
    with pytest.raises(ValueError, match="waveform"):
        frontend(torch.zeros(3))


# --- the head and the models -----------------------------------------------------------------

def test_classifier_select_module_matches_reference_backend():
    torch.manual_seed(0)
    head = ClassifierSelect(24, 5, n_classifiers=3, temperature=0.5, backend="cpu")
    h = torch.randn(9, 24)
    out = head(h)
    head.backend = "reference"
    ref = head(h)
    assert rel_err(out, ref) <= TOL[torch.float32]
    gates = head.gates(h)
    assert gates.shape == (9, 3) and torch.allclose(gates.sum(1), torch.ones(9))
    # features of the wrong width are named as h (the op would blame its gate_weight)
    for call in (head, head.gates):
        with pytest.raises(ValueError, match=r"h must be \(B, in_features=24\)"):
            call(torch.randn(9, 23))
    with pytest.raises(ValueError, match="backend must be one of"):
        ClassifierSelect(24, 5, backend="gpu")
    logits = torch.einsum("bf,kcf->bkc", h, head.weight) + head.bias
    assert rel_err(out, torch.einsum("bk,bkc->bc", gates, logits)) <= TOL[torch.float32]


def test_classifier_select_head_under_autocast_runs_in_bf16_as_linear_does():
    """fp32 features under bf16 autocast: nn.Linear computes in bf16; the head computed fp32."""
    torch.manual_seed(2)
    head, linear = ClassifierSelect(12, 5, 3), torch.nn.Linear(12, 5)
    h = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(h)
        assert out.dtype == linear(h).dtype == torch.bfloat16
    ref = head(h.bfloat16().float())  # fp32 arithmetic on the bf16-rounded features
    assert rel_err(out.float(), ref) <= 0.02


def test_cabcnn_backends_agree_in_forward_and_backward():
    torch.manual_seed(0)
    wave_batch = synthetic_audio(1, duration=0.25, seed=3).waveforms
    model = CABCNN(8, n_mels=16, n_classifiers=3, channels=(4, 8), backend="cpu").eval()
    out = model(wave_batch)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.head.backend = "reference"
    ref = model(wave_batch)
    ref.square().sum().backward()
    assert out.shape == (8, 8)
    assert rel_err(out, ref) <= TOL[torch.float32]
    for g, p in zip(grads, model.parameters()):
        assert rel_err(g, p.grad) <= 1e-4  # through BN and convs: several reductions reordered


def test_cabcnn_trains_under_bf16_autocast():
    """Under autocast the backbone hands the head bf16 features while its parameters stay fp32
    (the head refused the mix); it runs in the features' dtype, as nn.Linear does there."""
    torch.manual_seed(0)
    wave_batch = synthetic_audio(1, duration=0.25, seed=3).waveforms
    model = CABCNN(8, n_mels=16, n_classifiers=3, channels=(4, 8)).eval()
    full = model(wave_batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(wave_batch)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), full) <= 0.05  # bf16 features and products
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.head.parameters())


# --- synthetic audio --------------------------------------------------------------------------

def test_synthetic_audio_is_seeded_and_well_formed():
    a = synthetic_audio(3, seed=7)
    b = synthetic_audio(3, seed=7)
    c = synthetic_audio(3, seed=8)
    n = len(SYNTHETIC_CLASSES)
    assert a.waveforms.shape == (3 * n, 4000) and a.waveforms.dtype == torch.float32
    assert torch.equal(a.waveforms, b.waveforms) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.waveforms, c.waveforms)
    assert torch.equal(torch.bincount(a.labels), torch.full((n,), 3))
    peaks = a.waveforms.abs().amax(1)
    assert torch.isfinite(a.waveforms).all() and (peaks >= 0.1 - 1e-6).all() and (peaks <= 0.9 + 1e-6).all()
    assert len(a) == 3 * n and a[1][1] == 1 and a.classes == list(SYNTHETIC_CLASSES)


def test_synthetic_audio_onset_leaves_only_background_before_the_signal():
    def head_over_tail(max_onset):
        x = synthetic_audio(20, classes=["tone"], seed=1, max_onset=max_onset,
                            snr_db=(20.0, 20.0)).waveforms
        return x[:, :100].pow(2).mean(1) / x[:, -1000:].pow(2).mean(1)

    assert (head_over_tail(0.0) > 0.5).all()  # the tone is there from the first sample
    ratio = head_over_tail(0.5)
    late = ratio < 0.1
    # onsets are U(0, 0.5)·T: P(onset < 100 samples) = 5%, so nearly all clips start late, and
    # before the onset there is only the background, 20 dB (1/100 of the power) below the tone
    assert int(late.sum()) >= 15
    assert ((ratio[late] > 0.005) & (ratio[late] < 0.02)).all()


def test_synthetic_tone_and_chirp_spectra():
    sr = 8000
    clips = synthetic_audio(4, classes=["tone", "chirp_up", "chirp_down", "brown_noise"], seed=2,
                            max_onset=0.0, snr_db=(40.0, 40.0))
    spec = torch.stft(clips.waveforms, 256, 128, window=torch.hann_window(256),
                      return_complex=True).abs()  # (N, 129, frames)
    peak_hz = spec.argmax(1).float() * sr / 256  # dominant frequency per frame
    early, late = peak_hz[:, 3:8].mean(1), peak_hz[:, -8:-3].mean(1)
    tone, up, down = (clips.labels == 0), (clips.labels == 1), (clips.labels == 2)
    assert ((late - early)[tone].abs() < 50).all()
    assert ((late - early)[up] > 300).all() and ((early - late)[down] > 300).all()
    brown = clips.waveforms[clips.labels == 3]
    power = torch.fft.rfft(brown).abs().pow(2)
    assert (power[:, 1:50].mean(1) > 100 * power[:, 500:1000].mean(1)).all()  # 1/f² spectrum


@pytest.mark.parametrize("bad, match", [
    (dict(n_per_class=0), "n_per_class"), (dict(classes=["tone", "whistle"]), "classes"),
    (dict(duration=0.001), "duration"), (dict(max_onset=1.0), "max_onset"),
    (dict(gain=(0.0, 1.0)), "gain"), (dict(sample_rate=100), "sample_rate"),
    # below twice the highest frequency drawn (3 kHz) the classes alias: a chirp_up swept down
    (dict(sample_rate=6000), "sample_rate must be an int > 6000"), (dict(sample_rate=True), "sample_rate"),
    (dict(gain="ab"), "gain"), (dict(gain=(0.5,)), "gain"), (dict(gain=(0.5, math.nan)), "gain"),
    (dict(max_onset="0.1"), "max_onset"),
    (dict(duration=math.nan), "duration"), (dict(duration="0.5"), "duration"),
    (dict(snr_db=(math.nan, 10.0)), "snr_db"), (dict(snr_db=(-math.inf, -math.inf)), "snr_db"),
    (dict(snr_db=(30.0, 10.0)), "snr_db"),
])
def test_synthetic_audio_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        synthetic_audio(**{"n_per_class": 2, **bad})


# --- WAV folders -------------------------------------------------------------------------------

def _write_raw_wav(path, frames: bytes, channels: int, width: int, rate: int) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(frames)


def test_wav_folder_reads_pcm_widths_channels_and_pads(tmp_path):
    (tmp_path / "birds").mkdir()
    (tmp_path / "cars").mkdir()
    (tmp_path / "notes.txt").write_text("not a class")
    sr = 16000
    # 16-bit mono: samples 0, 16384, -32768
    _write_raw_wav(tmp_path / "birds" / "a.wav",
                   torch.tensor([0, 16384, -32768], dtype=torch.int16).numpy().tobytes(), 1, 2, sr)
    # 8-bit stereo (unsigned, offset 128): frames (255, 1) -> mean of (127/128, -127/128) = 0;
    # (192, 192) -> 0.5
    _write_raw_wav(tmp_path / "birds" / "b.WAV", bytes([255, 1, 192, 192]), 2, 1, sr)
    # 24-bit mono little-endian: 0x400000 = 0.5, 0xC00000 = -0.5, then 2 more frames
    _write_raw_wav(tmp_path / "cars" / "c.wav",
                   bytes([0, 0, 0x40, 0, 0, 0xC0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0]), 1, 3, sr)
    # hidden leftovers: a folder is not a class, an AppleDouble "._c.wav" is not a wav
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_wav(tmp_path / ".ipynb_checkpoints" / "x.wav", torch.zeros(3), sr)
    (tmp_path / "cars" / "._c.wav").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    clips = load_wav_folder(tmp_path)
    assert clips.classes == ["birds", "cars"] and clips.sample_rate == sr
    assert clips.labels.tolist() == [0, 0, 1]
    want = torch.tensor([[0.0, 0.5, -1.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0, 0.0],
                         [0.5, -0.5, 0.0, 0.5, 0.0]])
    assert torch.equal(clips.waveforms, want)
    assert load_wav_folder(tmp_path, num_samples=2).waveforms.shape == (3, 2)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got True"):
        load_wav_folder(tmp_path, num_samples=True)  # was taken as 1 sample


def test_wav_round_trip_of_synthetic_clips(tmp_path):
    clips = synthetic_audio(2, classes=["am", "fm"], seed=5, duration=0.1)
    for i, (x, y) in enumerate(clips):
        folder = tmp_path / clips.classes[int(y)]
        folder.mkdir(exist_ok=True)
        write_wav(folder / f"{i:03d}.wav", x, clips.sample_rate)
    loaded = load_wav_folder(tmp_path)
    order = torch.argsort(clips.labels, stable=True)  # the folder groups clips by class
    assert loaded.classes == ["am", "fm"] and torch.equal(loaded.labels, clips.labels[order])
    assert (loaded.waveforms - clips.waveforms[order]).abs().max() <= 1.5 / 32767  # 16-bit step


def test_wav_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="root"):
        load_wav_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_wav_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no .wav files"):
        load_wav_folder(tmp_path)
    write_wav(tmp_path / "a" / "x.wav", torch.zeros(10), 8000)
    (tmp_path / "b").mkdir()
    write_wav(tmp_path / "b" / "y.wav", torch.zeros(10), 16000)
    with pytest.raises(ValueError, match="sample rate 16000"):
        load_wav_folder(tmp_path)
    (tmp_path / "b" / "y.wav").write_bytes(b"RIFF not really")
    with pytest.raises(ValueError, match="not a PCM WAV"):
        read_wav(tmp_path / "b" / "y.wav")
    # a bad argument leaves an existing file as it was (the write is atomic)
    before = (tmp_path / "a" / "x.wav").read_bytes()
    for bad in (-8000, "8000", 0):
        with pytest.raises(ValueError, match="sample_rate must be a positive int"):
            write_wav(tmp_path / "a" / "x.wav", torch.zeros(10), bad)
    with pytest.raises(ValueError, match="waveform must be a"):
        write_wav(tmp_path / "a" / "x.wav", torch.zeros(2, 10), 8000)
    assert (tmp_path / "a" / "x.wav").read_bytes() == before
    with pytest.raises(ValueError, match="waveform holds non-finite"):
        write_wav(tmp_path / "a" / "x.wav", torch.tensor([0.0, math.nan]), 8000)
    with pytest.raises(TypeError, match="waveform must be a real floating tensor"):
        write_wav(tmp_path / "a" / "x.wav", torch.zeros(3, dtype=torch.complex64), 8000)
    assert (tmp_path / "a" / "x.wav").read_bytes() == before
    # a file cut off mid-sample names itself
    (tmp_path / "cut.wav").write_bytes(before[:-1] if (len(before) - 44) % 2 == 0 else before)
    with pytest.raises(ValueError, match="cut off mid-sample"):
        read_wav(tmp_path / "cut.wav")


def test_wav_read_then_write_changes_no_sample(tmp_path):
    """write_wav scaled by 32767 and read_wav by 32768: every load/save cycle drifted."""
    import numpy as np
    samples = torch.tensor([32767, 20000, -20000, -32768, 1, -1, 0], dtype=torch.int16)
    write_wav(tmp_path / "a.wav", samples.double() / 32768, 8000)
    for _ in range(3):
        x, rate = read_wav(tmp_path / "a.wav")
        write_wav(tmp_path / "a.wav", x, rate)
    raw = np.frombuffer((tmp_path / "a.wav").read_bytes()[-2 * len(samples):], dtype=np.int16)
    assert raw.tolist() == samples.tolist()


# --- training ----------------------------------------------------------------------------------

def _train_and_score(model, train, test, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 32):
            idx = perm[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(train.waveforms[idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(test.waveforms).argmax(1) == test.labels).float().mean())


def test_cabcnn_and_baseline_learn_synthetic_audio(one_thread, record_property):
    train = synthetic_audio(32, seed=11)
    test = synthetic_audio(16, seed=12)  # fresh clips: new frequencies, gains, onsets, noise
    chance = 1 / len(train.classes)
    results = {}
    for name, make in [("CABCNN", lambda: CABCNN(len(train.classes), n_classifiers=4)),
                       ("BaselineCNN", lambda: BaselineCNN(len(train.classes), hidden=128))]:
        torch.manual_seed(0)
        model = make()
        acc = _train_and_score(model, train, test, epochs=10, seed=1)
        results[name] = (count_parameters(model), acc)
        record_property(f"{name}_parameters", results[name][0])
        record_property(f"{name}_accuracy", acc)
    print("\n" + "\n".join(f"{n}: {p} parameters, test accuracy {a:.3f} (chance {chance:.3f})"
                           for n, (p, a) in results.items()))
    for name, (_, acc) in results.items():
        assert acc >= 0.6, (name, acc)  # chance is 0.125
    assert results["CABCNN"][0] < results["BaselineCNN"][0]  # the selection head is the smaller
