"""Training the attention classifier and watching its dynamics (Lu, Mao, Nayak, ICLR 2021).

With keys starting at 0 and a fixed query, gradient flow keeps, for every topic word t,
    ‖q‖²(‖v_t(τ)‖² − ‖v_t(0)‖²) = 2(s_t(τ) − s_t(0)) + (2/m)(e^{s_t(τ)} − e^{s_t(0)})
whatever the classifier (it assumes the m random words of a sentence keep scores near 0).
:class:`TopicDiagnostics` records s_t, ‖v_t‖ and the attention on t along training and
:func:`identity_residual` measures how far the two sides are apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from symfast.data.images import _check_int
from symfast.data.text import TextDataset
from symfast.ops import _checks


@dataclass
class TopicDiagnostics:
    """Per recorded step: ``score`` s_t, ``norm`` ‖v_t‖ and ``attention`` (the mean weight a
    sentence puts on t, over the sentences holding t), each (T, n_words) once stacked."""

    topic_words: torch.Tensor
    steps: list[int] = field(default_factory=list)
    score: list[torch.Tensor] = field(default_factory=list)
    norm: list[torch.Tensor] = field(default_factory=list)
    attention: list[torch.Tensor] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def record(self, step: int, model, tokens: torch.Tensor, weights: torch.Tensor,
               loss: float) -> None:
        words = self.topic_words.reshape(-1)
        with torch.no_grad():
            self.steps.append(step)
            self.score.append(model.scores()[words].double().cpu())
            self.norm.append(model.embedding[words].double().norm(dim=1).cpu())
            hits = (tokens[..., None] == words).double()  # (B, L, n_words)
            mass = torch.einsum("bl,blw->w", weights.double(), hits)
            self.attention.append((mass / hits.sum(dim=(0, 1)).clamp_min(1)).cpu())
            self.loss.append(loss)

    def stacked(self, name: str) -> torch.Tensor:
        values = getattr(self, name)
        if not values:
            raise ValueError(f"no diagnostics recorded yet (pass diagnostics= to a training "
                             f"function first): {name!r} is empty")
        return torch.stack(values)


def identity_residual(diagnostics: TopicDiagnostics, query_norm_sq: float, m: int,
                      min_rhs: float = 1e-3) -> torch.Tensor:
    """|lhs − rhs| / |rhs| at every recorded step (T, n_words), with
    lhs = ‖q‖²(‖v_t‖² − ‖v_t(0)‖²) and rhs = 2Δs_t + (2/m)Δe^{s_t} relative to the first record.
    Entries where |rhs| < ``min_rhs`` (the start, where both sides are ~0) are NaN."""
    _check_int("m", m, 1)  # the random words per sentence
    # ‖q‖² >= 0 and the cut-off: a string failed inside torch, NaN gave all-NaN residuals
    _checks.finite_number("query_norm_sq", query_norm_sq, positive=False)
    _checks.finite_number("min_rhs", min_rhs, positive=False)
    score, norm = diagnostics.stacked("score"), diagnostics.stacked("norm")
    lhs = query_norm_sq * (norm ** 2 - norm[0] ** 2)
    rhs = 2 * (score - score[0]) + (2 / m) * (score.exp() - score[0].exp())
    residual = (lhs - rhs).abs() / rhs.abs()
    return torch.where(rhs.abs() >= min_rhs, residual, torch.full_like(residual, math.nan))


def _step_loss(model, data: TextDataset, index=None):
    tokens, lengths, labels = data.tokens, data.lengths, data.labels
    if index is not None:
        tokens, lengths, labels = tokens[index], lengths[index], labels[index]
    logits, weights = model(tokens, lengths, return_weights=True)
    return F.cross_entropy(logits, labels), tokens, weights


def train_full_batch_gd(model, data: TextDataset, steps: int, lr: float = 0.1,
                        diagnostics: TopicDiagnostics | None = None,
                        record_every: int = 1) -> TopicDiagnostics | None:
    """Plain full-batch gradient descent on the mean cross-entropy, as in the paper. Records
    into ``diagnostics`` before the first step and every ``record_every`` steps after."""
    _check_int("steps", steps, 0)
    _check_int("record_every", record_every, 1)
    _checks.finite_number("lr", lr, positive=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps + 1):
        loss, tokens, weights = _step_loss(model, data)
        if diagnostics is not None and (step % record_every == 0 or step == steps):
            diagnostics.record(step, model, tokens, weights.detach(), float(loss.detach()))
        if step == steps:
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return diagnostics


def train_minibatch_adam(model, data: TextDataset, epochs: int, batch_size: int = 64,
                         lr: float = 1e-2, seed: int = 0,
                         diagnostics: TopicDiagnostics | None = None) -> list[float]:
    """Minibatch Adam over shuffled batches; returns the mean loss of each epoch and records
    into ``diagnostics`` after every epoch (on the last batch)."""
    _check_int("epochs", epochs, 0)
    _check_int("batch_size", batch_size, 1)
    _checks.finite_number("lr", lr, positive=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    _check_int("seed", seed, 0)  # a string reached torch.Generator.manual_seed as a RuntimeError
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        for start in range(0, len(data), batch_size):
            index = order[start:start + batch_size]
            loss, tokens, weights = _step_loss(model, data, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        history.append(total / len(data))
        if diagnostics is not None:
            diagnostics.record(epoch + 1, model, tokens, weights.detach(), history[-1])
    return history


def accuracy(model, data: TextDataset) -> float:
    with torch.no_grad():
        return float((model(data.tokens, data.lengths).argmax(-1) == data.labels).double().mean())
