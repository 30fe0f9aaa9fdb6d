"""symfast.ops.attention_pool: every backend against the reference (computed in fp64)."""
import pytest
import torch
from conftest import TOL, device_for, rel_err

from symfast.ops.attention_pool import attention_pool
from symfast.reference.attention_pool import attention_pool as reference

# (B, L, V, d, d_k): odd sizes; the triton interpreter is slow, so its shapes stay small, one
# shape has d > 128 so the kernels' d-chunk loops run more than once, and one L = 150 so their
# sentence-chunk loops (64 positions) do, the last chunk ragged.
SHAPES = {"reference": [(5, 7, 11, 9, 3), (33, 21, 97, 37, 13)],
          "cpu": [(5, 7, 11, 9, 3), (33, 21, 97, 37, 13), (6, 9, 40, 130, 5)],
          "triton": [(3, 5, 9, 7, 3), (2, 4, 6, 130, 5), (3, 150, 20, 9, 3)]}


def _inputs(b, l, v, d, dk, dtype, device, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, v, (b, l), generator=gen)
    lengths = torch.randint(1, l + 1, (b,), generator=gen)
    embedding = torch.randn(v, d, generator=gen)
    keys = torch.randn(v, dk, generator=gen)
    query = torch.randn(dk, generator=gen)
    tables = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
              for t in (embedding, keys, query)]
    return tokens.to(device), lengths.to(device), *tables


def _reference64(tokens, lengths, embedding, keys, query, mask_padding):
    tables = [t.detach().double().requires_grad_(True) for t in (embedding, keys, query)]
    pooled, weights = reference(tokens, lengths, *tables, mask_padding)
    return pooled, weights, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_forward_and_backward_match_reference(backend, dtype, mask_padding):
    device = device_for(backend)
    for seed, shape in enumerate(SHAPES[backend]):
        tokens, lengths, emb, keys, query = _inputs(*shape, dtype, device, seed=seed,
                                                    requires_grad=True)
        pooled, weights = attention_pool(tokens, lengths, emb, keys, query, mask_padding,
                                         return_weights=True, backend=backend)
        ref_pooled, ref_weights, ref_tables = _reference64(tokens, lengths, emb, keys, query,
                                                           mask_padding)
        assert pooled.dtype == dtype and weights.dtype == dtype
        assert pooled.shape == (shape[0], shape[3]) and weights.shape == shape[:2]
        assert rel_err(pooled, ref_pooled) <= TOL[dtype]
        assert rel_err(weights, ref_weights) <= TOL[dtype]
        if mask_padding:
            positions = torch.arange(shape[1], device=device)
            assert torch.all(weights[positions[None, :] >= lengths[:, None]] == 0)
        gen = torch.Generator().manual_seed(100 + seed)
        grad_pooled = torch.randn(ref_pooled.shape, generator=gen, dtype=torch.float64)
        grad_weights = torch.randn(ref_weights.shape, generator=gen, dtype=torch.float64)
        loss = (pooled * grad_pooled.to(device, dtype)).sum() + (
            weights * grad_weights.to(device, dtype)).sum()
        grads = torch.autograd.grad(loss, (emb, keys, query))
        ref_loss = (ref_pooled * grad_pooled).sum() + (ref_weights * grad_weights).sum()
        ref_grads = torch.autograd.grad(ref_loss, ref_tables)
        for name, g, r in zip(("embedding", "keys", "query"), grads, ref_grads):
            assert g.dtype == dtype and g.shape == r.shape, name
            assert rel_err(g, r) <= TOL[dtype], name


def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    b, l, v, d, dk = SHAPES[backend][0]
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, v, (l, b), generator=gen).to(device).t()  # (B, L), strided
    lengths = torch.randint(1, l + 1, (2 * b,), generator=gen).to(device)[::2]
    emb = torch.randn(v, 2 * d, generator=gen).to(device)[:, ::2]
    keys = torch.randn(dk + 3, v, generator=gen).to(device).t()[:, 1:dk + 1]
    query = torch.randn(2 * dk, generator=gen).to(device)[1::2]
    assert not any(t.is_contiguous() for t in (tokens, lengths, emb, keys, query))
    tables = [t.requires_grad_(True) for t in (emb, keys, query)]
    pooled = attention_pool(tokens, lengths, *tables, backend=backend)
    ref_pooled, _, ref_tables = _reference64(tokens, lengths, *tables, True)
    assert rel_err(pooled, ref_pooled) <= TOL[torch.float32]
    grad = torch.randn(pooled.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((pooled * grad.to(device, torch.float32)).sum(), tables)
    ref_grads = torch.autograd.grad((ref_pooled * grad).sum(), ref_tables)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= TOL[torch.float32]


@pytest.mark.parametrize("mask_padding", [True, False])
def test_gradcheck_fp64(backend, mask_padding):
    if backend == "reference":
        pytest.skip("the reference is differentiated by torch's own autograd")
    device = device_for(backend)
    tokens, lengths, emb, keys, query = _inputs(3, 5, 6, 4, 3, torch.float64, device, seed=3,
                                                requires_grad=True)
    tokens[0, :3] = 2  # repeated tokens: one table row accumulates several positions

    def fn(emb, keys, query):
        return attention_pool(tokens, lengths, emb, keys, query, mask_padding,
                              return_weights=True, backend=backend)

    # Under the (slow) triton interpreter, fast mode: one random projection of the Jacobian.
    fast = backend == "triton" and not torch.cuda.is_available()
    assert torch.autograd.gradcheck(fn, (emb, keys, query), fast_mode=fast)


def test_repeated_tokens_accumulate_and_are_deterministic():
    """A tiny vocabulary makes every row collect many positions (the race-prone case)."""
    tokens, lengths, emb, keys, query = _inputs(64, 31, 3, 17, 5, torch.float32, "cpu", seed=5,
                                                requires_grad=True)
    runs = []
    for _ in range(2):
        pooled, weights = attention_pool(tokens, lengths, emb, keys, query, return_weights=True,
                                         backend="cpu")
        runs.append(torch.autograd.grad(pooled.sum() + (weights ** 2).sum(), (emb, keys, query)))
    ref_pooled, ref_weights, ref_tables = _reference64(tokens, lengths, emb, keys, query, True)
    ref_grads = torch.autograd.grad(ref_pooled.sum() + (ref_weights ** 2).sum(), ref_tables)
    for g0, g1, r in zip(*runs, ref_grads):
        assert torch.equal(g0, g1)
        assert rel_err(g0, r) <= TOL[torch.float32]


def test_results_do_not_depend_on_the_thread_count():
    """Work is handed out in chunks to whichever thread is free (a thread slowed by another
    process takes fewer); grad_query's partial sums are kept per chunk, not per thread, so every
    output is the same bits at 1, 2 and 3 threads."""
    tokens, lengths, emb, keys, query = _inputs(61, 13, 23, 17, 5, torch.float32, "cpu", seed=7,
                                                requires_grad=True)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            pooled, weights = attention_pool(tokens, lengths, emb, keys, query, return_weights=True,
                                             backend="cpu")
            grads = torch.autograd.grad(pooled.sum() + (weights ** 2).sum(), (emb, keys, query))
            runs.append((pooled, weights, *grads))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dk", [16, 5])
def test_tables_past_the_caches_at_every_thread_count(dk):
    """Tables past 4 MB are streamed out, a vocabulary of many row chunks shared among the
    threads (grad_embedding and grad_keys' absent-token rows beside the score gradients, the
    other key rows after them): right for every subset of trainable tables and the same bits at
    1, 2 and 3 threads; d_k = 5 makes key rows that share cache lines between the two passes."""
    tokens, lengths, emb, keys, query = _inputs(40, 37, 5003, 210, dk, torch.float32, "cpu",
                                                seed=11)
    assert 5003 * (210 + dk) * 4 > 4 << 20
    ref_pooled, ref_weights, ref_tables = _reference64(tokens, lengths, emb, keys, query, True)
    ref_grads = torch.autograd.grad(ref_pooled.sum() + (ref_weights ** 2).sum(), ref_tables)
    before = torch.get_num_threads()
    try:
        for needs in ((1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 1, 1)):
            tables = [t.detach().requires_grad_(bool(n)) for t, n in zip((emb, keys, query), needs)]
            wanted = [t for t in tables if t.requires_grad]
            runs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                pooled, weights = attention_pool(tokens, lengths, *tables, return_weights=True,
                                                 backend="cpu")
                runs.append(torch.autograd.grad(pooled.sum() + (weights ** 2).sum(), wanted))
            for other in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
            refs = [r for r, n in zip(ref_grads, needs) if n]
            for g, r in zip(runs[0], refs):
                assert rel_err(g, r) <= TOL[torch.float32]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("needs", [(e, k, q) for e in (0, 1) for k in (0, 1) for q in (0, 1)
                                   if e or k or q])
def test_only_needed_gradients(needs):
    """Any subset of the tables trainable (the backward skips the token index, the score gradients
    or the table rows the others do not need): only those get gradients, and they are right."""
    tokens, lengths, emb, keys, query = _inputs(9, 6, 13, 5, 4, torch.float32, "cpu", seed=9)
    tables = (emb, keys, query)
    for t, need in zip(tables, needs):
        t.requires_grad_(bool(need))
    pooled = attention_pool(tokens, lengths, emb, keys, query, backend="cpu")
    pooled.sum().backward()
    ref_pooled, _, ref_tables = _reference64(tokens, lengths, emb, keys, query, True)
    ref_pooled.sum().backward()
    for t, ref, need in zip(tables, ref_tables, needs):
        if need:
            assert rel_err(t.grad, ref.grad) <= TOL[torch.float32]
        else:
            assert t.grad is None


def test_lengths_none_means_full_sentences(backend):
    device = device_for(backend)
    tokens, lengths, emb, keys, query = _inputs(*SHAPES[backend][0], torch.float32, device)
    full = torch.full_like(lengths, tokens.shape[1])
    out = attention_pool(tokens, None, emb, keys, query, backend=backend)
    assert torch.equal(out, attention_pool(tokens, full, emb, keys, query, backend=backend))


def test_opcheck_cpu():
    from symfast.ops.attention_pool import _attention_pool_op

    tokens, lengths, emb, keys, query = _inputs(4, 6, 10, 5, 3, torch.float32, "cpu", seed=2,
                                                requires_grad=True)
    torch.library.opcheck(_attention_pool_op, (tokens, lengths, emb, keys, query, False, "cpu"))


def test_bad_inputs():
    tokens, lengths, emb, keys, query = _inputs(4, 6, 10, 5, 3, torch.float32, "cpu")
    with pytest.raises(IndexError, match="tokens"):
        attention_pool(tokens + 10, lengths, emb, keys, query)
    with pytest.raises(IndexError, match="tokens"):
        attention_pool(tokens - 11, lengths, emb, keys, query)
    with pytest.raises(TypeError, match="tokens"):
        attention_pool(tokens.float(), lengths, emb, keys, query)
    with pytest.raises(ValueError, match="tokens"):
        attention_pool(tokens[0], lengths, emb, keys, query)
    for bad in (torch.zeros_like(lengths), lengths + 6):
        with pytest.raises(ValueError, match="lengths"):
            attention_pool(tokens, bad, emb, keys, query)
    with pytest.raises(ValueError, match="lengths"):
        attention_pool(tokens, lengths[:3], emb, keys, query)
    with pytest.raises(ValueError, match="keys"):
        attention_pool(tokens, lengths, emb, keys[:9], query)
    with pytest.raises(ValueError, match="query"):
        attention_pool(tokens, lengths, emb, keys, query[:2])
    with pytest.raises(ValueError, match="embedding"):
        attention_pool(tokens, lengths, emb[None], keys, query)
    with pytest.raises(TypeError, match="dtype"):
        attention_pool(tokens, lengths, emb, keys.double(), query)
    with pytest.raises(TypeError, match="embedding"):
        attention_pool(tokens, lengths, emb.long(), keys.long(), query.long())
    with pytest.raises(ValueError, match="backend"):
        attention_pool(tokens, lengths, emb, keys, query, backend="numpy")


def test_cpu_kernel_checks_bounds_itself():
    """The C++ kernels refuse out-of-range ids and lengths with the public op's errors (IndexError,
    ValueError, the same messages): the Python op leaves those checks to them on the cpu backend."""
    from symfast._ext import load_cpu_kernels

    assert load_cpu_kernels("attention_pool")
    tokens, lengths, emb, keys, query = _inputs(4, 6, 10, 5, 3, torch.float32, "cpu")
    fwd = torch.ops.symfast.attention_pool_fwd_cpu
    with pytest.raises(IndexError, match=r"tokens holds ids in \[\d+, \d+\], outside the vocabulary \[0, 10\)"):
        fwd(tokens + 10, lengths, emb, keys, query, True)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        fwd(tokens - 20, lengths, emb, keys, query, True)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, L = 6\], got values in"):
        fwd(tokens, lengths + 6, emb, keys, query, True)
    _, weights = fwd(tokens, lengths, emb, keys, query, True)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        torch.ops.symfast.attention_pool_bwd_cpu(torch.ones(4, 5), None, tokens + 10, lengths, emb,
                                                 keys, query, weights, True, True, True, True)
    for bad, exc in ((tokens + 10, IndexError), (tokens, ValueError)):
        with pytest.raises(exc):  # through the public op, which runs no value check of its own
            attention_pool(bad, lengths + 6 * (exc is ValueError), emb, keys, query, backend="cpu")


@pytest.mark.parametrize("d, dk", [(0, 4), (6, 0)])
def test_empty_feature_dims_match_the_reference(backend, d, dk):
    """d = 0 (no values) or d_k = 0 (no keys: uniform attention) are valid inputs on every
    backend (Triton's blocks of 0 made loops of step 0)."""
    dev = device_for(backend)
    tokens, lengths, embedding, keys, query = _inputs(3, 5, 10, d, dk, torch.float32, dev,
                                                      requires_grad=True)
    pooled, weights = attention_pool(tokens, lengths, embedding, keys, query,
                                     return_weights=True, backend=backend)
    (pooled.sum() + (weights * torch.arange(5.0, device=dev)).sum()).backward()
    ref_pooled, ref_weights, ref_tables = _reference64(tokens, lengths, embedding, keys, query,
                                                       True)
    (ref_pooled.sum() + (ref_weights * torch.arange(5.0, device=dev)).sum()).backward()
    assert pooled.shape == (3, d) and rel_err(weights, ref_weights) <= 1e-6
    if dk == 0:  # no scores: the mean over the sentence's words
        assert torch.allclose(weights.sum(1), torch.ones(3, device=dev))
    for got, ref in zip((embedding.grad, keys.grad, query.grad), ref_tables):
        assert got.shape == ref.shape and rel_err(got, ref.grad) <= 1e-6


def test_nan_query_leaves_unseen_words_key_gradient_zero(backend):
    """A word in no sentence has key gradient exactly 0 on every backend, even with NaN in q."""
    dev = device_for(backend)
    tokens = torch.randint(0, 6, (3, 5), device=dev)  # words 6..9 appear nowhere
    _, lengths, embedding, keys, query = _inputs(3, 5, 10, 6, 4, torch.float32, dev)
    query = query.clone()
    query[1] = float("nan")
    keys.requires_grad_(True)
    attention_pool(tokens, lengths, embedding, keys, query, backend=backend).sum().backward()
    assert torch.equal(keys.grad[6:], torch.zeros(4, 4, device=dev))


def test_masked_positions_take_no_part_even_with_nan_tables(backend):
    """The spec: with mask_padding, words past a sentence's length affect nothing; NaN in their
    embedding or key rows gives the same outputs and gradients as finite rows, on every backend
    (the reference used to give NaN through 0·NaN)."""
    dev = device_for(backend)
    tokens = torch.randint(0, 5, (3, 6), device=dev)
    lengths = torch.tensor([6, 2, 4], device=dev)
    for b in range(3):
        tokens[b, lengths[b]:] = 7  # padding word 7: in no sentence's valid part
    results = []
    for poison in (False, True):
        _, _, embedding, keys, query = _inputs(3, 6, 8, 5, 3, torch.float32, dev)
        if poison:
            embedding[7], keys[7] = float("nan"), float("nan")
        tables = [t.requires_grad_(True) for t in (embedding, keys, query)]
        pooled, weights = attention_pool(tokens, lengths, *tables, return_weights=True,
                                         backend=backend)
        (pooled.sum() + weights.pow(2).sum()).backward()
        results.append([pooled, weights] + [t.grad[:7] for t in tables[:2]] + [tables[2].grad])
    for clean, poisoned in zip(*results):
        assert poisoned.isfinite().all() and rel_err(poisoned, clean) <= 1e-6
