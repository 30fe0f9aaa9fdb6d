"""AttentionClassifier, the topic data, training loops and the persisting identity."""
import math

import pytest
import torch
from conftest import TOL, rel_err

from symfast.attention_dynamics import (TopicDiagnostics, accuracy, identity_residual,
                                        train_full_batch_gd, train_minibatch_adam)
from symfast.data.text import load_text_csv, topic_dataset
from symfast.models.attention_classifier import AttentionClassifier


@pytest.fixture
def one_thread():
    """The training problems here are small: one thread avoids an OpenMP fork/join per op,
    which on a shared 2-core machine costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_topic_dataset_is_the_papers_task():
    data = topic_dataset(n_sentences=300, vocab_size=500, m=20, seed=3)
    assert data.tokens.shape == (300, 21) and torch.all(data.lengths == 21)
    assert data.topic_words.shape == (4, 2)
    is_topic = data.tokens < 8
    assert torch.all(is_topic.sum(1) == 1)  # exactly one topic word per sentence ...
    assert torch.all(data.tokens[is_topic] // 2 == data.labels)  # ... of the sentence's topic
    assert data.tokens.max() < 500 and set(data.labels.tolist()) == {0, 1, 2, 3}
    again = topic_dataset(n_sentences=300, vocab_size=500, m=20, seed=3)
    assert torch.equal(again.tokens, data.tokens) and torch.equal(again.labels, data.labels)
    assert not torch.equal(topic_dataset(300, 500, seed=4).tokens, data.tokens)
    with pytest.raises(ValueError, match="vocab_size"):
        topic_dataset(vocab_size=8)
    with pytest.raises(ValueError, match="m"):
        topic_dataset(m=0)
    for name, bad in (("vocab_size", 100.5), ("vocab_size", "100"), ("n_sentences", True)):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            topic_dataset(**{name: bad})


def test_text_datasets_are_map_style_datasets():
    # TopicDataset had __len__ but no __getitem__: DataLoader(topic_dataset()) failed
    data = topic_dataset(n_sentences=10, vocab_size=30, m=3, seed=1)
    tokens, lengths, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert torch.equal(tokens, data.tokens[:4]) and torch.equal(lengths, data.lengths[:4])
    assert torch.equal(labels, data.labels[:4])
    assert torch.equal(data[-1][0], data.tokens[9])
    with pytest.raises(IndexError):
        data[10]


def test_load_text_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\nGood film good cast,pos\nbad film,neg\nGood ending,pos\n')
    data = load_text_csv(path, min_count=2)
    assert data.vocab == ["<pad>", "<unk>", "film", "good"]
    assert data.label_names == ["neg", "pos"] and data.labels.tolist() == [1, 0, 1]
    assert data.lengths.tolist() == [4, 2, 2]
    assert data.tokens.tolist() == [[3, 2, 3, 1], [1, 2, 0, 0], [3, 1, 0, 0]]
    assert load_text_csv(path, max_length=2).tokens.shape == (3, 2)
    with pytest.raises(ValueError, match="sentence"):
        load_text_csv(path, text_column="sentence")
    with pytest.raises(ValueError, match="path"):
        load_text_csv(tmp_path / "missing.csv")
    for bad in (0, -1, 2.5, True):  # 0 made every sentence one <unk>, -1 dropped last words
        with pytest.raises(ValueError, match="max_length must be a positive int or None"):
            load_text_csv(path, max_length=bad)
    with pytest.raises(ValueError, match="min_count must be a non-negative int"):
        load_text_csv(path, min_count=-1)
    # a spreadsheet's "CSV UTF-8" starts with a byte-order mark; a short row names its file
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\nhi there,a\n")
    assert load_text_csv(tmp_path / "bom.csv").vocab == ["<pad>", "<unk>", "hi", "there"]
    (tmp_path / "short.csv").write_text("text,label\nfine,a\nno label here\n")
    with pytest.raises(ValueError, match="short.csv, data row 2: no 'label' value"):
        load_text_csv(tmp_path / "short.csv")
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv is not UTF-8"):
        load_text_csv(tmp_path / "latin.csv")
    # an unquoted comma split a text: its tail became the label (a made-up class ' really bad')
    # and the real label was dropped, silently
    (tmp_path / "comma.csv").write_text("text,label\ngreat movie,pos\nbad, really bad,neg\n")
    with pytest.raises(ValueError, match="comma.csv, data row 2: more fields than the header"):
        load_text_csv(tmp_path / "comma.csv")
    (tmp_path / "quoted.csv").write_text('text,label\ngreat movie,pos\n"bad, really bad",neg\n')
    assert load_text_csv(tmp_path / "quoted.csv").label_names == ["neg", "pos"]
    # integer labels by value: label id k is the k-th class (string order gave 1, 10, 2)
    (tmp_path / "numeric.csv").write_text("text,label\na,10\nb,2\nc,1\nd,x\n")
    numeric = load_text_csv(tmp_path / "numeric.csv")
    assert numeric.label_names == ["1", "2", "10", "x"] and numeric.labels.tolist() == [2, 1, 0, 3]


def test_load_text_csv_reads_a_held_out_file_with_the_training_ids(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nred apple,fruit\nblue car,vehicle\n"
                                        "green pear,fruit\nred truck,vehicle\nblue sky,colour\n")
    (tmp_path / "test.csv").write_text("text,label\ntruck car,vehicle\npear plum,fruit\n")
    train = load_text_csv(tmp_path / "train.csv")
    test = load_text_csv(tmp_path / "test.csv", vocab=train.vocab, label_names=train.label_names)
    words = {w: i for i, w in enumerate(train.vocab)}
    assert test.vocab == train.vocab and test.vocab_size == train.vocab_size
    assert test.tokens.tolist() == [[words["truck"], words["car"]], [words["pear"], 1]]  # plum: <unk>
    assert [train.label_names[i] for i in test.labels] == ["vehicle", "fruit"]
    assert test.n_classes == 3  # the training set's classes, though the file has two
    (tmp_path / "new.csv").write_text("text,label\nboat,ship\n")
    with pytest.raises(ValueError, match="new.csv, data row 1: label 'ship' is not in label_names"):
        load_text_csv(tmp_path / "new.csv", label_names=train.label_names)
    for bad in (["apple"], ["<unk>", "<pad>", "x"], ["<pad>", "<unk>", "a", "a"], "abc"):
        with pytest.raises(ValueError, match="vocab must be a list of distinct words"):
            load_text_csv(tmp_path / "test.csv", vocab=bad)
    with pytest.raises(ValueError, match="min_count=2 has no effect"):
        load_text_csv(tmp_path / "test.csv", vocab=train.vocab, min_count=2)
    with pytest.raises(ValueError, match="label_names"):
        load_text_csv(tmp_path / "test.csv", label_names=[])


def test_load_text_csv_literal_pad_and_unk_words_are_unknown_words(tmp_path):
    # "<pad>" written in a text is a word: it must not become padding (id 0) inside the sentence,
    # nor sit twice in the vocabulary
    (tmp_path / "t.csv").write_text("text,label\nhello <pad> world <unk>,a\nhello,b\n")
    for min_count in (1, 2):
        data = load_text_csv(tmp_path / "t.csv", min_count=min_count)
        assert data.vocab.count("<pad>") == 1 and data.vocab.count("<unk>") == 1
        assert data.tokens[0, 1] == 1 and data.tokens[0, 3] == 1 and data.lengths[0] == 4
        assert (data.tokens[0, :4] != 0).all()


def test_tl_head_is_drawn_from_the_generator_and_the_generator_is_checked():
    def build():
        return AttentionClassifier(30, 6, 4, 3, head="tl", hidden=5,
                                   generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = build()
    torch.manual_seed(2)  # another global state: the model must not depend on it
    b = build()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    w = a.head[0].weight  # nn.Linear's own distribution: U(±1/sqrt(fan_in))
    assert w.abs().max() <= 6 ** -0.5 and w.std() > 0.5 * 6 ** -0.5 / 3 ** 0.5
    for head in ("tl", "fc", "tc"):  # building with a generator leaves the global stream alone
        torch.manual_seed(3)
        want = torch.rand(4)
        torch.manual_seed(3)
        AttentionClassifier(30, 6, 4, 3, head=head, generator=torch.Generator().manual_seed(0))
        assert torch.equal(torch.rand(4), want), head  # nn.Linear's init drew from it first
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        AttentionClassifier(30, 6, 4, 3, generator=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        AttentionClassifier(30, 6, 4, 3, backend="gpu")  # at construction, not the first forward


def test_paper_initialisation_and_heads():
    gen = torch.Generator().manual_seed(0)
    model = AttentionClassifier(4000, 10, 10, 4, head="fc", generator=gen)
    assert torch.all(model.keys == 0)
    assert abs(model.embedding.std().item() - 1e-6) < 0.05e-6
    assert not model.query.requires_grad
    fc = model.head.weight
    assert not fc.requires_grad and torch.all(fc.diagonal() == 1)
    tc = AttentionClassifier(50, 10, 10, 4, head="tc").head.weight
    assert tc.requires_grad and torch.all(tc.diagonal() == 1)
    tl = AttentionClassifier(50, 10, 10, 4, head="tl")
    assert [p.shape for p in tl.head.parameters()] == [(10, 10), (10,), (4, 10), (4,)]
    assert AttentionClassifier(50, 10, 10, 4, train_query=True).query.requires_grad
    queries = torch.stack([AttentionClassifier(5, 10, 64, 4).query for _ in range(20)])
    assert abs(queries.std().item() - 0.3) < 0.03
    with pytest.raises(ValueError, match="head"):
        AttentionClassifier(50, 10, 10, 4, head="cnn")
    with pytest.raises(ValueError, match="d_k"):
        AttentionClassifier(50, 10, 0, 4)


def test_model_backends_agree():
    data = topic_dataset(n_sentences=40, vocab_size=60, m=6, seed=1)
    outs = []
    for backend in ("reference", "cpu"):
        model = AttentionClassifier(60, 8, 5, 4, head="tl", backend=backend,
                                    generator=torch.Generator().manual_seed(2))
        torch.manual_seed(2)  # the TL head's nn.Linear init
        model.head = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(),
                                         torch.nn.Linear(10, 4))
        with torch.no_grad():
            model.embedding.normal_(generator=torch.Generator().manual_seed(3))
            model.keys.normal_(generator=torch.Generator().manual_seed(4))
        logits = model(data.tokens, data.lengths)
        logits.logsumexp(-1).sum().backward()
        outs.append((logits, model.embedding.grad, model.keys.grad))
    for out, ref in zip(*outs):
        assert rel_err(out, ref) <= TOL[torch.float32]


# The paper's task at a reduced size and a larger step so a test fits in seconds: 2,000 sentences
# over a 2,000-word vocabulary keep the paper's 20 occurrences per random word (N·m/V, which the
# identity's "random scores stay near 0" rests on), and lr = 1 instead of 0.1 covers the same
# gradient-flow time in 10x fewer steps. Gradient descent, unlike the flow, adds Σ‖Δv‖² to ‖v‖²,
# a bias of order 1/step while v grows linearly from ~0, so the identity is checked once the
# topic scores have moved (rhs ≥ 0.5, i.e. Δs_t ≳ 0.25).
#
# How far the attention gets depends on the query draw. By the identity a topic word's score is
# set by ‖q‖²‖v_t‖², and with a trainable head the head grows along with the embeddings (under
# the flow ‖W‖² − Σ_w‖v_w‖² is conserved), so the loss vanishes while ‖v_t‖ is still moderate;
# after that every gradient scales with the loss and the attention creeps up only
# logarithmically in time. q ~ N(0, 0.3² I_10) has E‖q‖² = 0.9 (interquartile range 0.61-1.13).
# Measured on this task (TC, min attention over the 8 topic words after 1,000 steps, lr 1):
#   ‖q‖² 0.36 -> 0.30, 0.43 -> 0.34, 0.54 -> 0.39, 0.64 -> 0.43, 0.80 -> 0.48, 0.88 -> 0.50,
#   0.97 -> 0.53, 1.05 -> 0.55, 1.19 -> 0.58, 1.89 -> 0.70, 2.61 -> 0.78
# (model seeds 0-14); seed 1's query, ‖q‖² = 0.36 (about the 5th percentile), is why TC had
# stalled near 0.3. FC reaches ≥ 0.58 within 600 steps for every one of those draws. The test
# uses seed 14, whose ‖q‖² = 0.878 is the draw nearest E‖q‖² among seeds 0-14, for both heads,
# and checks that the draw is typical: with a query in the lower ~45% of draws TC stays below
# 0.5 at this budget (e.g. 0.30 -> 0.34 from step 1,000 to 4,000 for seed 1).
MODEL_SEED = 14


@pytest.mark.parametrize("head,steps", [("fc", 600), ("tc", 2000)])
def test_persisting_identity_and_topic_attention(one_thread, head, steps):
    data = topic_dataset(n_sentences=2000, vocab_size=2000, m=20, seed=0)
    model = AttentionClassifier(2000, 10, 10, 4, head=head,
                                generator=torch.Generator().manual_seed(MODEL_SEED))
    query_norm_sq = float(model.query.norm() ** 2)
    assert 0.61 <= query_norm_sq <= 1.13  # a typical draw of N(0, 0.3² I_10), not a lucky one
    diagnostics = train_full_batch_gd(model, data, steps, lr=1.0,
                                      diagnostics=TopicDiagnostics(data.topic_words),
                                      record_every=steps // 40)
    residual = identity_residual(diagnostics, query_norm_sq, data.m, min_rhs=0.5)
    checked = ~residual.isnan()
    assert checked[-1].all() and checked.sum() >= 0.5 * checked.numel()
    assert residual[checked].max() <= 0.02
    attention = diagnostics.stacked("attention")  # (T, 8)
    assert torch.allclose(attention[0], torch.full((8,), 1 / 21, dtype=torch.float64), rtol=1e-4)
    assert torch.all(attention[1:] >= attention[:-1])  # grows steadily, for every topic word
    assert diagnostics.loss[-1] < 0.5 * diagnostics.loss[0]
    assert accuracy(model, data) == 1.0
    assert attention[-1].min() >= 0.5  # the requirement, for both heads


def test_minibatch_adam_learns_the_topics(one_thread):
    data = topic_dataset(n_sentences=600, vocab_size=600, m=20, seed=5)
    model = AttentionClassifier(600, 10, 10, 4, head="tl",
                                generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    diagnostics = TopicDiagnostics(data.topic_words)
    history = train_minibatch_adam(model, data, epochs=6, batch_size=64, lr=0.05,
                                   diagnostics=diagnostics)
    assert len(history) == 6 and history[-1] < 0.25 * history[0]
    assert accuracy(model, data) >= 0.95
    assert diagnostics.stacked("attention")[-1].mean() > 3 / 21
    assert not math.isnan(history[-1])


def test_training_helpers_name_their_bad_arguments():
    data = topic_dataset(8, 50, m=3)
    model = AttentionClassifier(50, 8, 8, 2)
    with pytest.raises(ValueError, match="no diagnostics recorded yet"):
        identity_residual(TopicDiagnostics(data.topic_words), 1.0, 3)
    for name, kwargs in (("steps", {"steps": 2.5}), ("steps", {"steps": -1}),
                         ("record_every", {"steps": 2, "record_every": 0})):
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            train_full_batch_gd(model, data, **kwargs)
    for name, kwargs in (("batch_size", {"epochs": 1, "batch_size": 1.5}), ("epochs", {"epochs": True})):
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            train_minibatch_adam(model, data, **kwargs)
    for lr in (-1.0, 0.0, float("nan"), float("inf"), True):  # trained on silently before
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            train_full_batch_gd(model, data, 1, lr=lr)
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            train_minibatch_adam(model, data, 1, lr=lr)
    import numpy as np
    classes = int(data.labels.max()) + 1  # a numpy scalar is a number
    train_full_batch_gd(AttentionClassifier(50, 8, 8, classes), data, 1, lr=np.float32(0.1))
    for name, bad in (("query_norm_sq", "1"), ("query_norm_sq", -2.0), ("min_rhs", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            identity_residual(TopicDiagnostics(data.topic_words), **{"query_norm_sq": 1.0, "m": 3, name: bad})
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        train_minibatch_adam(model, data, 1, seed="a")
    with pytest.raises(ValueError, match="m must be an int >= 1"):  # ZeroDivisionError before
        identity_residual(TopicDiagnostics(data.topic_words), 1.0, 0)
