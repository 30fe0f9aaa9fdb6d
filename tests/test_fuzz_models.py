"""Property-based fuzzing (hypothesis) of the classifier models (issue 15): AttentionClassifier
(on attention_pool) and CABCNN (its head ClassifierSelect on classifier_select).

``test_fuzz_attention_classifier`` and ``test_fuzz_cabcnn`` draw valid but odd models and inputs
and compare the logits and the gradients of the trainable parameters (and of the waveform) on
the backend under test with the reference backend, as tests/_module_fuzz.py specifies: the
backend and the reference in the drawn dtype, the reference in float64 on the same rounded
values (and twice more with the references' softmaxes perturbed); NaN/inf exactly where the
same-dtype reference has them, elsewhere no further from float64 than 4x the larger of the
reference's own error and the perturbed runs', plus TOL[dtype]. What is drawn: size-1 and prime
sizes, B = 0, every float dtype, tokens / lengths / waveforms laid out contiguous, transposed,
sliced, offset and expanded (stride 0), parameters at drawn magnitudes (huge, tiny, exact zeros)
with now and then a NaN/inf in the embedding or the keys, or a NaN in the waveform; CABCNN in
eval() and in train() mode (BatchNorm's batch statistics).

``test_fuzz_bad_inputs_raise_clear_errors`` corrupts one argument (a constructor's or forward's)
and wants a ValueError / TypeError (IndexError for token ids outside the vocabulary) naming it,
on every backend. The plain tests below it: CABCNN ignores a waveform's gain at any magnitude,
both models take an empty batch, and CABCNN's front end in bfloat16/float16.

Budget: the op fuzz suite's (``SYMFAST_FUZZ_EXAMPLES``, default 40; the Triton interpreter an
eighth)::

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_fuzz_models.py

Defects found and fixed in the model files (each has a test here that fails without the fix):
CABCNN on an empty batch (torch.stft refused it), on an int/bool/complex waveform or one whose
dtype or device is not the model's (RuntimeErrors from inside torch), in bfloat16/float16 (no
FFT for them), the unit-RMS scaling of the front end (a waveform below ~1e-8 RMS, or one whose
square overflowed, lost its gain invariance: at 1e-30 in float64 every band sat on the log
floor), unchecked constructor arguments of CABCNN, BaselineCNN and ClassifierSelect (non-int
sizes failed inside torch, a bad temperature only at the first forward), and
AttentionClassifier's constructor taking bools as sizes and non-bool flags.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import event, note
from hypothesis import strategies as st

from _module_fuzz import grads, rounded, run_three, with_backend
from conftest import TOL, rel_err
from symfast.models import CABCNN, AttentionClassifier, BaselineCNN, ClassifierSelect
from symfast.models.attention_classifier import HEADS
from test_fuzz_ops import (BACKENDS, EXP, FLOATS, NOT_REAL, _INTERPRETED, Spec, _device, _expect,
                           _fuzz, make_leaf, specs, view)

TESTED = [b for b in BACKENDS if b != "reference"]
INT_LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "offset")
WAVE_LAYOUTS = ("contiguous", "transposed", "reversed", "sliced", "offset", "expanded")
PARAM = ("contiguous",)  # parameter values are copied in; their layout does not matter


def _small(backend: str) -> bool:
    return backend == "triton" and _INTERPRETED


def _seed_exp(dtype: torch.dtype) -> tuple[int, int]:
    return (-3, 3) if dtype == torch.float16 else (-8, 8)


def _poison(draw, names) -> tuple | None:
    """Now and then (1 draw in 6) one element of one of ``names`` set to NaN or ±inf."""
    if not draw(st.sampled_from([False] * 5 + [True])):  # hypothesis favours the first
        return None
    return (draw(st.sampled_from(names)), draw(st.integers(0, 2**31 - 1)),
            draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])))


def _apply_poison(t: torch.Tensor, name: str, poison) -> torch.Tensor:
    if poison is None or poison[0] != name or t.numel() == 0:
        return t
    t = t.clone()
    t.view(-1)[poison[1] % t.numel()] = poison[2]
    return t


# ---------------------------------------------------------------------------------------------
# AttentionClassifier
# ---------------------------------------------------------------------------------------------

@st.composite
def attention_model_cases(draw, backend: str):
    small = _small(backend)
    dtype = draw(st.sampled_from(FLOATS))
    v = draw(st.sampled_from([1, 2, 3, 5, 7, 13, 31, 59] if not small else [1, 2, 3, 5]))
    d = draw(st.sampled_from([1, 2, 3, 5, 7, 9] if not small else [1, 2, 3]))
    dk = draw(st.sampled_from([1, 2, 3, 5, 7, 9] if not small else [1, 2, 3]))
    n_classes = draw(st.sampled_from([1, 2, 3, 5]))
    hidden = draw(st.sampled_from([1, 2, 3, 5]))
    head = draw(st.sampled_from(HEADS))
    b = draw(st.sampled_from([2, 1, 3, 5, 0] if not small else [2, 1, 0]))
    l = draw(st.sampled_from([3, 1, 2, 5, 7] if not small else [3, 1, 2]))
    config = dict(vocab_size=v, d=d, d_k=dk, n_classes=n_classes, head=head, hidden=hidden,
                  train_query=draw(st.booleans()), mask_padding=draw(st.booleans()))
    shapes = {n: tuple(p.shape) for n, p in AttentionClassifier(**config).named_parameters()}
    # scores q·k from ~0 (uniform weights) to ~2^12 (one-hot), as the op's fuzz draws them;
    # embeddings at any magnitude the head's layers keep finite (fp16: its narrow range)
    lo, hi = EXP[dtype]
    exps = {"keys": (-6, 3) if dtype == torch.float16 else (-15, 6),
            "embedding": (-6, 1) if dtype == torch.float16 else (lo, hi // 2)}
    exps["query"] = exps["keys"]
    head_exp = (-4, -1) if dtype == torch.float16 else (lo // 4, hi // 4)
    params = {n: draw(specs(s, dtype, exp=exps.get(n, head_exp), kinds=PARAM))
              for n, s in shapes.items()}
    lengths = None
    if draw(st.booleans()):
        lengths = (draw(st.sampled_from([torch.int64, torch.int32])),
                   draw(specs((b,), None, kinds=INT_LAYOUTS)))
    return dict(dtype=dtype, config=config, b=b, l=l, params=params,
                tokens_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                tokens=draw(specs((b, l), None, kinds=INT_LAYOUTS)), lengths=lengths,
                seed=draw(specs((b, n_classes), dtype, exp=_seed_exp(dtype))),
                poison=_poison(draw, ["embedding", "keys"]))


def _attention_body(backend: str, case: dict) -> None:
    dtype, config = case["dtype"], case["config"]
    base = AttentionClassifier(**config)
    with torch.no_grad():
        for name, p in base.named_parameters():
            value = make_leaf(case["params"][name], dtype).double()
            p.copy_(_apply_poison(value, name, case["poison"]))
    tokens = make_leaf(case["tokens"], case["tokens_dtype"], 0, config["vocab_size"])
    lengths = None
    if case["lengths"] is not None:
        lengths = make_leaf(case["lengths"][1], case["lengths"][0], 1, case["l"] + 1)
    seed = make_leaf(case["seed"], dtype)
    note(f"tokens {view(case['tokens'], tokens).tolist()}, lengths "
         f"{None if lengths is None else view(case['lengths'][1], lengths).tolist()}")
    # When every sentence scores a single word, the keys' and query's gradients are exactly 0
    # and computed they are rounding alone (test_one_word_sentences_keys_gradient): there they
    # are checked for NaN/inf only.
    unjudged = {"grad keys", "grad query"} if _one_word_sentences(case, tokens, lengths) else set()
    if unjudged:
        event("every sentence of one word: keys and query gradients checked for NaN/inf only")
    results = {}

    def run(be: str, compute: torch.dtype) -> dict:
        dev = _device(be)
        model = with_backend(base, be, dtype, compute).to(dev)
        t = view(case["tokens"], tokens.to(dev))
        n = None if lengths is None else view(case["lengths"][1], lengths.to(dev))
        logits = model(t, n)
        assert logits.dtype == compute and tuple(logits.shape) == (case["b"], config["n_classes"])
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        found = grads(logits, [p for _, p in trained],
                      view(case["seed"], rounded(seed, dtype, compute).to(dev)))
        out = {"logits": logits, **{f"grad {name}": g for (name, _), g in zip(trained, found)}}
        results[be, compute] = out
        return {name: t for name, t in out.items() if name not in unjudged}

    run_three(run, backend, dtype)
    for name in unjudged & results[backend, dtype].keys():
        got, ref = results[backend, dtype][name], results["reference", dtype][name]
        assert torch.equal(torch.isfinite(got).cpu(), torch.isfinite(ref).cpu()), (
            f"{name}: NaN/inf not where the reference has them")


def _one_word_sentences(case: dict, tokens: torch.Tensor, lengths: torch.Tensor | None) -> bool:
    """Whether every sentence's scored positions (those before its length with mask_padding,
    else all L) hold one and the same word."""
    t = view(case["tokens"], tokens)
    same = t == t[:, :1]
    if case["config"]["mask_padding"] and lengths is not None:
        n = view(case["lengths"][1], lengths)
        same |= torch.arange(case["l"])[None, :] >= n[:, None]
    return bool(same.all())


@pytest.mark.parametrize("backend", TESTED)
def test_fuzz_attention_classifier(backend):
    _fuzz(backend, attention_model_cases(backend), _attention_body)


ONE_WORD = (
    "not a kernel defect: a sentence of one word has keys/query gradients of exactly 0 (the "
    "softmax backward a_j (da_j - sum_k a_k da_k) with every da_j alike), and computed they are "
    "the rounding of that cancellation: here the cpu kernel gives ~7e-7 at |da| ~ 1 in fp32, "
    "torch's reference happens to give exactly 0, and the two perturbed float64 runs of "
    "_module_fuzz.run_three give 1.7e-7, so 4x that is short of the kernel's ~3 u (for fp64 the "
    "perturbation of 2^-52 can vanish altogether: 1 + 2^-52 r is 1 for |r| < 1/2); the fuzz keeps "
    "clear of such sentences for these two gradients")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=ONE_WORD)
def test_one_word_sentences_keys_gradient():
    # found by test_fuzz_attention_classifier[cpu] at SYMFAST_FUZZ_EXAMPLES=400: vocabulary of
    # one word, two sentences of three positions
    config = dict(vocab_size=1, d=9, d_k=1, n_classes=5, head="fc", hidden=1, train_query=False,
                  mask_padding=False)
    base = AttentionClassifier(**config).double()
    with torch.no_grad():
        values = [((1, 9), 0, False), ((1, 1), 0, False), ((1,), 0, False), ((5, 9), 72, True)]
        for p, (shape, seed, zeros) in zip(base.parameters(), values):
            p.copy_(make_leaf(Spec(shape, ("contiguous",), seed, 0, 0, zeros), torch.float64))
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    seed = make_leaf(Spec((2, 5), ("contiguous",), 176), torch.float32)

    def run(be: str, compute: torch.dtype) -> dict:
        model = with_backend(base, be, torch.float32, compute)
        logits = model(tokens)
        (grad_keys,) = grads(logits, [model.keys], rounded(seed, torch.float32, compute))
        return {"grad keys": grad_keys}

    # one pinned example, through hypothesis (run_three's notes need a running test)
    _fuzz("cpu", st.just(None), lambda backend, _: run_three(run, backend, torch.float32),
          share=0, cheap=True)


# ---------------------------------------------------------------------------------------------
# CABCNN
# ---------------------------------------------------------------------------------------------

HEAD_PARAMS = ("gate_weight", "gate_bias", "weight", "bias")
WAVE_EXP = {torch.float16: (-14, 13), torch.bfloat16: (-120, 120), torch.float32: (-120, 120),
            torch.float64: (-1000, 1000)}


@st.composite
def cabcnn_cases(draw, backend: str):
    small = _small(backend)
    dtype = draw(st.sampled_from(FLOATS))
    n_fft = draw(st.sampled_from([16, 32]))
    channels = draw(st.sampled_from([(2,), (3, 4), (1,)]))
    config = dict(n_classes=draw(st.integers(1, 5)), n_mels=draw(st.integers(4, 16)),
                  n_classifiers=draw(st.integers(1, 4)), n_fft=n_fft, hop_length=8,
                  channels=channels, sample_rate=draw(st.sampled_from([8000, 16000, 44100])),
                  temperature=draw(st.one_of(
                      st.sampled_from([1.0, 1e-3, 1e3, 0.37]),
                      st.builds(lambda k: 2.0 ** k, st.integers(-10, 10)))))
    b = draw(st.sampled_from([2, 1, 3, 0] if not small else [2, 1, 0]))
    t = draw(st.one_of(st.integers(n_fft // 2 + 1, n_fft // 2 + 9),
                       st.integers(n_fft, 120 if small else 300)))
    shapes = {n: tuple(p.shape) for n, p in ClassifierSelect(
        channels[-1], config["n_classes"], config["n_classifiers"]).named_parameters()}
    head_exp = (-4, 2) if dtype == torch.float16 else (-12, 12)
    # any magnitude the dtype holds: the front end scales each clip to unit RMS
    wave = draw(specs((b, t), dtype, kinds=WAVE_LAYOUTS, exp=WAVE_EXP[dtype]))
    return dict(dtype=dtype, config=config, b=b, t=t, train=draw(st.booleans()), wave=wave,
                backbone_seed=draw(st.integers(0, 2**31 - 1)),
                params={n: draw(specs(s, dtype, exp=head_exp, kinds=PARAM))
                        for n, s in shapes.items()},
                seed=draw(specs((b, config["n_classes"]), dtype, exp=_seed_exp(dtype))),
                poison=_poison(draw, ["waveform"]))


def _cabcnn_model(case: dict) -> CABCNN:
    """The model in float64: the drawn head, a seeded backbone (the same PyTorch code on every
    backend) with running statistics away from their initial 0 and 1."""
    model = CABCNN(**case["config"]).double()
    gen = torch.Generator().manual_seed(case["backbone_seed"])
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) / 3)
            elif isinstance(m, torch.nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 2.0), (m.bias, -0.5, 0.5),
                                  (m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0)):
                    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float64))
        for name in HEAD_PARAMS:
            getattr(model.head, name).copy_(make_leaf(case["params"][name], case["dtype"]).double())
    return model


def _cabcnn_body(backend: str, case: dict) -> None:
    dtype = case["dtype"]
    base = _cabcnn_model(case)
    wave = _apply_poison(make_leaf(case["wave"], dtype), "waveform", case["poison"])
    seed = make_leaf(case["seed"], dtype)

    def run(be: str, compute: torch.dtype) -> dict:
        dev = _device(be)
        model = with_backend(base, be, dtype, compute).to(dev).train(case["train"])
        leaf = rounded(wave, dtype, compute).to(dev).requires_grad_(True)
        x = view(case["wave"], leaf)
        logits = model(x)
        assert logits.dtype == compute
        assert tuple(logits.shape) == (case["b"], case["config"]["n_classes"])
        inputs = [getattr(model.head, n) for n in HEAD_PARAMS] + [x]
        found = grads(logits, inputs, view(case["seed"], rounded(seed, dtype, compute).to(dev)))
        return {"logits": logits,
                **{f"grad {n}": g for n, g in zip(HEAD_PARAMS + ("waveform",), found)}}

    event(f"{dtype}, {'train' if case['train'] else 'eval'}")
    run_three(run, backend, dtype)


@pytest.mark.parametrize("backend", TESTED)
def test_fuzz_cabcnn(backend):
    _fuzz(backend, cabcnn_cases(backend), _cabcnn_body)


# ---------------------------------------------------------------------------------------------
# bad inputs: a ValueError / TypeError naming the argument (IndexError for token ids), on every
# backend, from the constructor or before any kernel runs
# ---------------------------------------------------------------------------------------------

BAD_SIZES = [0, -1, True, False, 2.0, "3", None]


@st.composite
def attention_bad_cases(draw):
    """(kind, callable(backend), exception, message regex)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b, l, v = draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    config = dict(vocab_size=v, d=draw(st.integers(1, 3)), d_k=draw(st.integers(1, 3)),
                  n_classes=draw(st.integers(1, 3)), head=draw(st.sampled_from(HEADS)))
    tokens = torch.randint(0, v, (b, l), generator=gen)
    lengths = torch.randint(1, l + 1, (b,), generator=gen) if draw(st.booleans()) else None
    kind = draw(st.sampled_from([
        "size", "head", "flag", "tokens_dtype", "tokens_rank", "tokens_high", "tokens_low",
        "lengths_value", "lengths_dtype", "lengths_shape", "tokens_meta", "lengths_meta",
        "param_dtype", "tokens_type", "lengths_type"]))
    convert = None
    if kind == "size":
        name = draw(st.sampled_from(["vocab_size", "d", "d_k", "n_classes", "hidden"]))
        config[name] = draw(st.sampled_from(BAD_SIZES))
        exc, match = ValueError, f"{name} must be a positive int"
    elif kind == "head":
        config["head"] = draw(st.sampled_from(["FC", "cnn", "", None, 1]))
        exc, match = ValueError, "head must be one of"
    elif kind == "flag":
        name = draw(st.sampled_from(["train_query", "mask_padding"]))
        config[name] = draw(st.sampled_from([1, 0, None, "yes", torch.tensor(True)]))
        exc, match = TypeError, f"{name} must be a bool"
    elif kind == "tokens_dtype":
        tokens = tokens.to(draw(st.sampled_from([torch.float32, torch.float64, torch.int16,
                                                 torch.uint8, torch.bool])))
        exc, match = TypeError, "tokens must be an integer"
    elif kind == "tokens_rank":
        tokens = draw(st.sampled_from([tokens[0] if b else tokens.flatten(), tokens[None],
                                       tokens[..., None]]))
        exc, match = ValueError, r"tokens must have shape \(B, L\)"
    elif kind in ("tokens_high", "tokens_low"):
        b = max(b, 1)
        tokens = torch.randint(0, v, (b, l), generator=gen)
        where = draw(st.integers(0, b - 1)), draw(st.integers(0, l - 1))
        tokens[where] = (v + draw(st.sampled_from([0, 1, 10**6])) if kind == "tokens_high"
                         else draw(st.sampled_from([-1, -v, -2**40])))
        lengths = None
        exc, match = IndexError, "tokens holds ids .* outside the vocabulary"
    elif kind == "lengths_value":
        b = max(b, 1)
        tokens = torch.randint(0, v, (b, l), generator=gen)
        lengths = torch.randint(1, l + 1, (b,), generator=gen)
        lengths[draw(st.integers(0, b - 1))] = draw(st.sampled_from([0, -1, l + 1, l + 100]))
        exc, match = ValueError, "lengths must lie in"
    elif kind == "lengths_dtype":
        lengths = torch.ones(b).to(draw(st.sampled_from([torch.float32, torch.bool, torch.int16])))
        exc, match = TypeError, "lengths must be an integer tensor"
    elif kind == "lengths_shape":
        lengths = draw(st.sampled_from([torch.ones(b + 1, dtype=torch.int64),
                                        torch.ones(1, b, dtype=torch.int64)]))
        exc, match = ValueError, "lengths must be an integer tensor of shape"
    elif kind == "tokens_type":
        tokens = draw(st.sampled_from([tokens.tolist(), tokens.numpy()]))
        exc, match = TypeError, "tokens must be a torch.Tensor"
    elif kind == "lengths_type":
        lengths = [l] * b
        exc, match = TypeError, "lengths must be a torch.Tensor"
    elif kind == "tokens_meta":
        tokens, lengths = tokens.to("meta"), None
        exc, match = ValueError, "tokens is on meta"
    elif kind == "lengths_meta":
        lengths = torch.ones(b, dtype=torch.int64, device="meta")
        exc, match = ValueError, "lengths is on meta"
    else:
        # one table in another dtype than the embedding's (a model half converted by hand)
        name = draw(st.sampled_from(["keys", "query"]))
        convert = (name, draw(st.sampled_from([torch.float64, torch.bfloat16, torch.float16])))
        exc, match = TypeError, f"{name} has dtype torch.* but embedding has torch.float32"

    def call(backend):
        model = AttentionClassifier(**config, backend=backend)
        if convert is not None:
            p = getattr(model, convert[0])
            p.data = p.data.to(convert[1])
        return model(tokens, lengths)
    return kind, call, exc, match


@st.composite
def cabcnn_bad_cases(draw):
    """(kind, callable(backend), exception, message regex)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n_fft = draw(st.sampled_from([16, 32]))
    b, t = draw(st.integers(0, 3)), draw(st.integers(n_fft // 2 + 1, 64))
    config = dict(n_classes=draw(st.integers(1, 3)), n_mels=draw(st.integers(4, 8)), n_fft=n_fft,
                  hop_length=8, channels=(2,), n_classifiers=draw(st.integers(1, 3)))
    waveform = torch.randn(b, t, generator=gen)
    model_dtype = torch.float32
    kind = draw(st.sampled_from([
        "size", "channels", "temperature_value", "temperature_type", "n_fft", "head_size",
        "wave_dtype", "wave_mismatch", "wave_rank", "wave_short", "wave_meta", "wave_type"]))
    make = CABCNN
    if kind == "size":
        name = draw(st.sampled_from(["n_classes", "n_mels", "n_classifiers", "hop_length",
                                     "sample_rate", "n_fft"]))
        config[name] = draw(st.sampled_from(BAD_SIZES))
        exc, match = ValueError, f"{name} must be a positive int"
    elif kind == "channels":
        config["channels"] = draw(st.sampled_from([(), (0,), (2, -1), (2.0,), (True,), ("4",), 4,
                                                   None]))
        exc, match = ValueError, "channels must be a non-empty sequence of positive ints"
    elif kind == "temperature_value":
        config["temperature"] = draw(st.sampled_from([0.0, -0.0, -1.0, float("nan"),
                                                      float("inf"), 1e-40, -1e3]))
        exc, match = ValueError, "temperature must be (finite|>=)"
    elif kind == "temperature_type":
        config["temperature"] = draw(st.sampled_from(["1", None, True, 1j, torch.tensor(1.0)]))
        exc, match = TypeError, "temperature must be a real number"
    elif kind == "n_fft":
        config["n_fft"] = 1
        exc, match = ValueError, "n_fft must be >= 2"
    elif kind == "head_size":
        # the head alone, and BaselineCNN's
        name = draw(st.sampled_from(["in_features", "n_classes", "n_classifiers", "hidden"]))
        bad = draw(st.sampled_from(BAD_SIZES))
        if name == "hidden":
            def make(backend, **_):
                return BaselineCNN(2, n_mels=4, n_fft=16, hop_length=8, channels=(2,), hidden=bad)
        else:
            sizes = dict(in_features=3, n_classes=2, n_classifiers=2)
            sizes[name] = bad

            def make(backend, **_):
                return ClassifierSelect(**sizes, backend=backend)
        exc, match = ValueError, f"{name} must be a positive int"
    elif kind == "wave_dtype":
        waveform = waveform.to(draw(st.sampled_from(NOT_REAL)))
        exc, match = TypeError, "waveform must be a real floating-point"
    elif kind == "wave_mismatch":
        model_dtype, other = draw(st.sampled_from(
            [(torch.float32, torch.float64), (torch.float32, torch.bfloat16),
             (torch.float64, torch.float32), (torch.bfloat16, torch.float16),
             (torch.float16, torch.float32)]))
        waveform = waveform.to(other)
        exc, match = TypeError, f"waveform has dtype {other} but the model has {model_dtype}"
    elif kind == "wave_rank":
        waveform = draw(st.sampled_from([torch.randn(t, generator=gen),
                                         torch.randn(1, b, t, generator=gen), torch.tensor(1.0)]))
        exc, match = ValueError, r"waveform must be \(B, T\)"
    elif kind == "wave_short":
        waveform = torch.randn(b, draw(st.integers(0, n_fft // 2)), generator=gen)
        exc, match = ValueError, rf"waveform has \d+ samples; need > n_fft/2 = {n_fft // 2}"
    elif kind == "wave_meta":
        waveform = waveform.to("meta")
        exc, match = ValueError, "waveform is on meta but the model is on cpu"
    else:
        waveform = draw(st.sampled_from([waveform.tolist(), waveform.numpy(), 1.0]))
        exc, match = TypeError, "waveform must be a torch.Tensor"

    def call(backend):
        model = make(backend=backend, **config).to(model_dtype)
        return model(waveform)
    return kind, call, exc, match


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["attention_classifier", "cabcnn"])
def test_fuzz_bad_inputs_raise_clear_errors(backend, model):
    cases = {"attention_classifier": attention_bad_cases, "cabcnn": cabcnn_bad_cases}[model]

    def body(backend, case):
        kind, call, exc, match = case
        _expect(lambda: call(backend), exc, match)

    _fuzz(backend, cases(), body, share=0.5, cheap=True)


# ---------------------------------------------------------------------------------------------
# plain properties
# ---------------------------------------------------------------------------------------------

def _small_cabcnn(backend: str, dtype=torch.float64) -> CABCNN:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CABCNN(3, n_mels=8, n_classifiers=3, n_fft=32, hop_length=8, channels=(3, 4),
                       backend=backend)
    return model.to(_device(backend), dtype).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cabcnn_ignores_the_gain_at_any_magnitude(backend):
    # the front end scales each clip to unit RMS: a gain of 1e-30 sat under its 1e-8 floor (every
    # band on the log's eps), one of 1e300 (1e19 in fp32) overflowed its square
    model = _small_cabcnn(backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, generator=gen, dtype=torch.float64)
    x[1, :100] = 0.0  # silence in part of a clip
    x = x.to(_device(backend))
    want = model(x)
    for scale in (1e-30, 1e30, 1e-300, 1e300, 3.7e-8, 0.01):
        assert rel_err(model(x * scale), want) <= TOL[torch.float64], scale
    # in fp32, a power-of-two gain changes no bit anywhere, down to 2^-100 and up to 2^100
    model = _small_cabcnn(backend, torch.float32)
    x = x.float()
    want = model(x)
    for k in (-100, -40, 40, 100):
        assert torch.equal(model(x * 2.0 ** k), want), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("train", [False, True])
def test_cabcnn_empty_batch(backend, dtype, train):
    model = _small_cabcnn(backend, dtype).train(train)
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(0, 40, dtype=dtype, device=_device(backend), requires_grad=True)
    out = model(x)
    assert out.shape == (0, 3) and out.dtype == dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 40)
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    for name, b in model.named_buffers():  # BatchNorm's running statistics untouched
        if "num_batches_tracked" not in name:
            assert torch.equal(b, before[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_classifier_empty_batch(backend, dtype):
    dev = _device(backend)
    model = AttentionClassifier(7, 3, 2, 4, head="tl", train_query=True, backend=backend)
    model = model.to(dev, dtype)
    tokens = torch.zeros(0, 5, dtype=torch.int64, device=dev)
    out = model(tokens, torch.ones(0, dtype=torch.int64, device=dev))
    assert out.shape == (0, 4) and out.dtype == dtype
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cabcnn_low_precision_front_end(backend, dtype):
    # .bfloat16() / .half() models: torch.stft has no bf16/fp16 FFT; the front end computes in
    # fp32 and rounds the spectrogram once
    low = _small_cabcnn(backend, dtype)
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(2)).to(_device(backend), dtype)
    spec = low.frontend(x)
    # the same front end (its window and filters as the model holds them) in fp32, rounded once
    spec32 = copy.deepcopy(low.frontend).float()(x.float())
    assert spec.dtype == dtype and torch.equal(spec, spec32.to(dtype))
    out = low(x)
    assert out.dtype == dtype and out.shape == (2, 3) and torch.isfinite(out).all()
