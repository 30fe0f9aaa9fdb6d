"""The PyTorch Philox reference against Triton's own tl.philox / tl.randn (interpreter on CPU)."""
import torch
import pytest

from conftest import device_for
from symfast import _backend
from symfast import philox

triton_ok = _backend.triton_status()[0]
needs_triton = pytest.mark.skipif(not triton_ok, reason="triton not importable")

if triton_ok:
    import triton
    import triton.language as tl

    @triton.jit
    def _randn_kernel(out_ptr, seed, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.randn(seed, offs), mask=offs < N)

    @triton.jit
    def _philox_kernel(out_ptr, seed, c1, c2, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        z = offs * 0
        r0, r1, r2, r3 = tl.philox(seed, offs.to(tl.uint32), (z + c1).to(tl.uint32),
                                   (z + c2).to(tl.uint32), z.to(tl.uint32))
        mask = offs < N
        tl.store(out_ptr + offs * 4, r0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + offs * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + offs * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + offs * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF, mask=mask)


@needs_triton
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, -3])
def test_randn_matches_triton(seed):
    dev = device_for("triton")
    n = 1000
    out = torch.empty(n, dtype=torch.float32, device=dev)
    _randn_kernel[(triton.cdiv(n, 256),)](out, seed, n, BLOCK=256)
    ref = philox.randn_counter(seed, torch.arange(n, device=dev))  # what tl.randn(seed, offset) draws
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ref.cpu(), out.cpu(), rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("seed,c1,c2", [(7, 0, 0), (99, 3, 5), (2**33 + 1, 123456, 2**31 + 9)])
def test_philox_bits_match_triton(seed, c1, c2):
    dev = device_for("triton")
    n = 300
    out = torch.empty(n * 4, dtype=torch.int64, device=dev)
    _philox_kernel[(triton.cdiv(n, 128),)](out, seed, c1, c2, n, BLOCK=128)
    ref = torch.stack(philox.philox(seed, torch.arange(n, device=dev), c1, c2, 0), dim=1).reshape(-1)
    assert torch.equal(ref.cpu(), out.cpu())


def test_known_answer_vector():
    # Random123's published Philox4x32-10 known-answer test (kat_vectors): counter = key = 0.
    out = philox.philox(0, torch.zeros(1, dtype=torch.int64), 0, 0, 0)
    assert [int(v) for v in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_noise_statistics_and_keys():
    key = philox.noise_key(5, 4)
    z = philox.sample_noise(key, step=0, shape=(4, 3, 32, 32))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    # per-sample seeds: a sample's noise is independent of its batch and position
    key_a = philox.noise_key([11, 22, 33], 3)
    key_b = philox.noise_key([33, 11], 2)
    za = philox.sample_noise(key_a, 4, (3, 5, 7))
    zb = philox.sample_noise(key_b, 4, (2, 5, 7))
    assert torch.equal(za[2], zb[0]) and torch.equal(za[0], zb[1])
    # different steps / streams give different noise
    assert not torch.equal(z[0], z[1])
    assert not torch.equal(philox.sample_noise(key, 1, (4, 8))[0], philox.sample_noise(key, 2, (4, 8))[0])


def test_noise_key_bad_inputs():
    with pytest.raises(ValueError, match="seed has 2 entries"):
        philox.noise_key([1, 2], 3)
    with pytest.raises(TypeError, match="seed"):
        philox.noise_key(1.5, 3)
    with pytest.raises(TypeError, match="seed"):
        philox.noise_key(torch.ones(3), 3)


def test_sample_noise_checks_its_key_step_and_shape():
    """A key of another batch size gave other samples' noise (or another shape) silently, and a
    step outside [0, 2^32) wrapped."""
    from symfast.philox import noise_key, sample_noise
    key = noise_key(11, 2)
    for bad_key in (noise_key(11, 4), key.to(torch.int32), key[:, :1]):
        with pytest.raises(ValueError, match=r"key must be an int64 tensor of shape \(2, 2\)"):
            sample_noise(bad_key, 1, (2, 8))
    for step in (2**32, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"step must be an int in \[0, 2\^32\)"):
            sample_noise(key, step, (2, 8))
    with pytest.raises(ValueError, match="shape must be"):
        sample_noise(key, 1, (2, -1))


def test_a_seed_is_any_64_bit_word():
    """s and s - 2^64 are the same 64 bits: seeds up to 2^64 - 1 were refused with torch's
    overflow errors while the negative seeds that share their bits passed."""
    from symfast.philox import noise_key, sample_noise
    assert torch.equal(noise_key(2**64 - 5, 2), noise_key(-5, 2))
    assert torch.equal(sample_noise(noise_key([2**63], 1), 0, (1, 4)),
                       sample_noise(noise_key([-2**63], 1), 0, (1, 4)))
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=r"seed must be an int in \[-2\^63, 2\^64\)"):
            noise_key(seed, 1)
    with pytest.raises(ValueError, match="batch must be an int >= 0"):
        noise_key(1, -1)


def test_seeded_generator_uses_all_64_bits_of_the_seed():
    """torch's CPU generator keeps a seed's low 32 bits: data seeds 0 and 2^32 drew the same clean
    split and Gaussian-mixture samples (found by a user tryout)."""
    def draw(seed):
        return torch.randn(4, generator=philox.seeded_generator(seed))
    for seed in (0, 1, 12345, 2**32 - 1):  # below 2^32 the seed is used as it is
        assert torch.equal(draw(seed), torch.randn(4, generator=torch.Generator().manual_seed(seed)))
    seeds = (0, 2**32, 2**33, 2**63, -1, 2**64 - 2**32, 1, 2**32 + 1)
    draws = [draw(s) for s in seeds]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    assert torch.equal(draw(-1), draw(2**64 - 1))  # the same 64-bit word
