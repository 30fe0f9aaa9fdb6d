"""Text classification data: the synthetic topic task of Lu, Mao, Nayak (ICLR 2021), and a loader
for a user's CSV of (text, label) rows with a whitespace vocabulary."""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from symfast.ops import _checks
from symfast.philox import seeded_generator

PAD, UNK = "<pad>", "<unk>"


@dataclass
class TextDataset:
    """tokens: (N, L) int64 word ids (padding id 0 after each sentence's end); lengths: (N,);
    labels: (N,) int64 in [0, n_classes)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    vocab_size: int
    n_classes: int
    vocab: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (L,), length (), label ()) of sentence ``i``: a map-style torch Dataset, as the
        image and audio sets are (DataLoader batches them to (B, L), (B,), (B,))."""
        return self.tokens[i], self.lengths[i], self.labels[i]


@dataclass
class TopicDataset(TextDataset):
    """The synthetic topic task; ``topic_words[c]`` are the ids of topic c's words and ``m`` the
    number of random words per sentence."""

    topic_words: torch.Tensor = None
    m: int = 0


def topic_dataset(n_sentences: int = 5000, vocab_size: int = 5000, n_topics: int = 4,
                  words_per_topic: int = 2, m: int = 20, seed: int = 0) -> TopicDataset:
    """Each sentence = one topic word of its class (label = the topic) + ``m`` random words drawn
    uniformly from the non-topic words, in random order. Topic c's words have ids
    c*words_per_topic ... (c+1)*words_per_topic - 1; every sentence has length m + 1."""
    for name, value in (("n_sentences", n_sentences), ("vocab_size", vocab_size), ("n_topics", n_topics),
                        ("words_per_topic", words_per_topic), ("m", m)):
        _checks.positive_int(name, value)
    n_topic_words = n_topics * words_per_topic
    if vocab_size <= n_topic_words:
        raise ValueError(f"vocab_size must exceed the {n_topic_words} topic words, got {vocab_size}")
    gen = seeded_generator(seed)
    labels = torch.randint(0, n_topics, (n_sentences,), generator=gen)
    topic_word = labels * words_per_topic + torch.randint(0, words_per_topic, (n_sentences,),
                                                          generator=gen)
    random_words = torch.randint(n_topic_words, vocab_size, (n_sentences, m), generator=gen)
    sentences = torch.cat([topic_word[:, None], random_words], dim=1)
    order = torch.argsort(torch.rand(n_sentences, m + 1, generator=gen), dim=1)
    tokens = torch.gather(sentences, 1, order)
    return TopicDataset(
        tokens=tokens, lengths=torch.full((n_sentences,), m + 1, dtype=torch.int64), labels=labels,
        vocab_size=vocab_size, n_classes=n_topics,
        topic_words=torch.arange(n_topic_words).reshape(n_topics, words_per_topic), m=m)


def _label_order(label: str) -> tuple:
    """Sort key: integer labels ("2", "10", "-1") by value, before any other label by string."""
    try:
        return (0, int(label), label)
    except ValueError:
        return (1, 0, label)


def load_text_csv(path: str | Path, text_column: str = "text", label_column: str = "label",
                  max_length: int | None = None, min_count: int = 1,
                  lowercase: bool = True, vocab: list[str] | None = None,
                  label_names: list[str] | None = None) -> TextDataset:
    """Read a CSV with a header holding ``text_column`` and ``label_column``. Words are split on
    whitespace; words seen fewer than ``min_count`` times map to <unk> (id 1), padding is id 0,
    and the literal words "<pad>" and "<unk>" in the text are unknown words too.
    Sentences longer than ``max_length`` are cut; labels are numbered in sorted order (integer
    labels by value: 1, 2, 10). A row with more fields than the header (an unquoted comma in a
    text) is an error.

    A held-out file must be read with its training set's ids: pass ``vocab=train.vocab`` (words
    outside it map to <unk>; ``min_count`` then does not apply) and ``label_names=train.label_names``
    (a label outside them is an error).
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise ValueError(f"min_count must be a non-negative int, got {min_count!r}")
    if vocab is not None:
        if (not isinstance(vocab, (list, tuple)) or len(vocab) < 2 or tuple(vocab[:2]) != (PAD, UNK)
                or not all(isinstance(w, str) for w in vocab) or len(set(vocab)) != len(vocab)):
            raise ValueError(f"vocab must be a list of distinct words starting with {PAD!r}, {UNK!r} "
                             f"(a TextDataset's .vocab)")
        if min_count != 1:
            raise ValueError(f"min_count={min_count} has no effect with a given vocab; leave it at 1")
    if label_names is not None and (
            not isinstance(label_names, (list, tuple)) or not label_names
            or not all(isinstance(n, str) for n in label_names) or len(set(label_names)) != len(label_names)):
        raise ValueError("label_names must be a non-empty list of distinct label strings "
                         "(a TextDataset's .label_names)")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a file")
    # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which would be read
    # into the first column's name
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            for column in (text_column, label_column):
                if reader.fieldnames is None or column not in reader.fieldnames:
                    raise ValueError(f"{path} has no column {column!r}; columns: {reader.fieldnames}")
            rows = []
            for row, fields in enumerate(reader, start=1):
                # DictReader puts fields past the header under the key None: an unquoted comma
                # in a text split it, and the label column then held the text's second part
                if None in fields:
                    raise ValueError(f"{path}, data row {row}: more fields than the header "
                                     f"{reader.fieldnames} (a text holding a comma must be quoted)")
                rows.append((fields[text_column], fields[label_column]))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    for row, (text, label) in enumerate(rows, start=1):
        if text is None or label is None:
            missing = text_column if text is None else label_column
            raise ValueError(f"{path}, data row {row}: no {missing!r} value (fewer fields than the "
                             f"header)")
    if not rows:
        raise ValueError(f"{path} holds no rows")
    sentences = [(text.lower() if lowercase else text).split() for text, _ in rows]
    if vocab is None:
        counts = Counter(word for words in sentences for word in words if word not in (PAD, UNK))
        vocab = [PAD, UNK] + sorted(w for w, c in counts.items() if c >= min_count)
    vocab = list(vocab)
    index = {w: i for i, w in enumerate(vocab)}
    index[PAD] = 1  # a literal "<pad>" in the text is a word, not the end of the sentence
    if label_names is None:
        # integer labels by value (1, 2, 10: label id k is class k's rank), others as strings
        label_names = sorted({label for _, label in rows}, key=_label_order)
    label_names = list(label_names)
    label_index = {name: i for i, name in enumerate(label_names)}
    for row, (_, label) in enumerate(rows, start=1):
        if label not in label_index:
            raise ValueError(f"{path}, data row {row}: label {label!r} is not in label_names "
                             f"{label_names}")
    ids = [[index.get(w, 1) for w in words][:max_length] or [1] for words in sentences]
    length = max(len(s) for s in ids)
    tokens = torch.zeros((len(ids), length), dtype=torch.int64)
    for i, sentence in enumerate(ids):
        tokens[i, :len(sentence)] = torch.tensor(sentence)
    return TextDataset(
        tokens=tokens, lengths=torch.tensor([len(s) for s in ids]),
        labels=torch.tensor([label_index[label] for _, label in rows]), vocab_size=len(vocab),
        n_classes=len(label_names), vocab=vocab, label_names=label_names)
