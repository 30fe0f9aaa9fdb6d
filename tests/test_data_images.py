import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from symfast import groups
from symfast.data import (GaussianMixture, ImageTensorDataset, digits, gaussian_mixture,
                          image_folder, orbit_augmented, read_image, save_image_grid)

from conftest import rel_err

QUANT = 1 / 127.5


def _sklearn_digits():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return torch.from_numpy(bunch.images).double() / 8 - 1, torch.from_numpy(bunch.target).long()


def _row_multiset(images: torch.Tensor) -> Counter:
    """The rows of (N, ...) as a multiset of their exact bytes."""
    flat = images.reshape(images.shape[0], -1).contiguous().numpy()
    return Counter(row.tobytes() for row in flat)


# ---- ImageTensorDataset --------------------------------------------------------------------

def test_image_tensor_dataset_basics():
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 4, dtype=torch.float64).reshape(5, 3, 4, 4)
    ds = ImageTensorDataset(images, name="ramp", labels=torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32))
    assert len(ds) == 5 and ds.shape == (3, 4, 4) and ds.channels == 3 and ds.image_size == 4
    assert ds.images.dtype == torch.float32 and ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64
    torch.testing.assert_close(ds[2], images[2].float(), rtol=0, atol=0)
    batch = ds.get_batch(torch.tensor([4, 0, 4]))
    torch.testing.assert_close(batch, images[[4, 0, 4]].float(), rtol=0, atol=0)
    assert "N=5" in repr(ds) and "(3, 4, 4)" in repr(ds) and "ramp" in repr(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    assert next(iter(loader)).shape == (2, 3, 4, 4)


def test_image_tensor_dataset_errors():
    with pytest.raises(TypeError, match="images"):
        ImageTensorDataset(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"4-d floating.*\(1, 2, 2\)"):
        ImageTensorDataset(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="int64"):
        ImageTensorDataset(torch.zeros(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one"):
        ImageTensorDataset(torch.zeros(0, 1, 2, 2))
    with pytest.raises(ValueError, match=r"labels.*\(2,\)"):
        ImageTensorDataset(torch.zeros(2, 1, 2, 2), labels=torch.zeros(3, dtype=torch.int64))
    ds = ImageTensorDataset(torch.zeros(2, 1, 2, 3))
    with pytest.raises(ValueError, match=r"non-square.*\(2, 3\)"):
        ds.image_size
    with pytest.raises(TypeError, match="indices"):
        ds.get_batch(torch.tensor([0.0, 1.0]))


# ---- digits --------------------------------------------------------------------------------

def test_digits_raw_and_labels():
    ref, target = _sklearn_digits()
    ds = digits(size=8)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1 and ds.images.max() == 1
    torch.testing.assert_close(ds.images[:, 0].double(), ref, rtol=0, atol=0)
    assert ds.labels.dtype == torch.int64 and torch.equal(ds.labels, target)
    # the cached array is not shared with the caller
    ds.images.zero_()
    assert digits(size=8).images.min() == -1


def _bilinear_matrix(out: int, inp: int) -> torch.Tensor:
    """(out, inp) weights of 1-d linear interpolation with half-pixel centres (align_corners=False)."""
    a = torch.zeros(out, inp, dtype=torch.float64)
    for i in range(out):
        src = max((i + 0.5) * inp / out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), inp - 1)
        i1 = min(i0 + 1, inp - 1)
        frac = src - i0
        a[i, i0] += 1 - frac
        a[i, i1] += frac
    return a


def test_digits_resize_matches_bilinear_formula():
    ref, target = _sklearn_digits()
    ds = digits(size=16)
    assert ds.images.shape == (1797, 1, 16, 16) and ds.images.dtype == torch.float32
    assert torch.equal(ds.labels, target)
    a = _bilinear_matrix(16, 8)
    expected = a @ ref @ a.T
    assert (ds.images[:, 0].double() - expected).abs().max() <= 1e-6
    small = digits(size=4)
    assert small.images.shape == (1797, 1, 4, 4)
    assert small.images.min() >= -1 and small.images.max() <= 1
    # antialiased downsampling keeps the overall brightness (a plain 4-tap sampling would not)
    assert abs(float(small.images.mean()) - float(ref.mean())) < 0.05


def test_digits_pad_centres_raw_images():
    ref, _ = _sklearn_digits()
    ds = digits(size=12, mode="pad")
    assert ds.images.shape == (1797, 1, 12, 12)
    torch.testing.assert_close(ds.images[:, 0, 2:10, 2:10].double(), ref, rtol=0, atol=0)
    border = ds.images.clone()
    border[:, :, 2:10, 2:10] = -1
    assert torch.all(border == -1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=3), "size"), (dict(size=16.0), "size"), (dict(size=True), "size"),
    (dict(size=8, mode="nearest"), "mode"), (dict(size=6, mode="pad"), "size"),
    (dict(size=11, mode="pad"), "even"),
])
def test_digits_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits(**kwargs)


# ---- orbit augmentation --------------------------------------------------------------------

def test_orbit_augmented_layout_and_invariance():
    ds = digits(size=8)
    group = groups.get("d4")
    aug = orbit_augmented(ds, "d4")
    n, order = len(ds), len(group)
    assert len(aug) == n * order and aug.name == "digits8-d4"
    for i in (0, 1, 1234, n - 1):
        for k in range(order):
            assert torch.equal(aug[i * order + k], group.act(ds[i], k))
    assert torch.equal(aug.labels, ds.labels.repeat_interleave(order))
    rows = _row_multiset(aug.images)
    for k in range(order):
        assert _row_multiset(group.act(aug.images, k)) == rows
    # the check can fail: the raw digits are not rotation-invariant
    assert _row_multiset(group.act(ds.images, 1)) != _row_multiset(ds.images)


def test_orbit_augmented_non_square():
    ds = ImageTensorDataset(torch.randn(3, 2, 4, 6), name="rect")
    with pytest.raises(ValueError, match=r"dataset.*\(3, 2, 4, 6\).*square"):
        orbit_augmented(ds, "c4")
    aug = orbit_augmented(ds, groups.c2())  # 180° rotation needs no square
    assert len(aug) == 6 and aug.labels is None
    assert torch.equal(aug[5], torch.flip(ds[2], dims=(-2, -1)))
    with pytest.raises(TypeError, match="dataset"):
        orbit_augmented(ds.images, "c2")


# ---- image folder --------------------------------------------------------------------------

def _write_folder(root):
    sub = root / "sub"
    sub.mkdir()
    # grey, 12 wide × 4 high: the centre crop (columns 4..7) is exactly the white stripe
    stripe = np.zeros((4, 12), dtype=np.uint8)
    stripe[:, 4:8] = 255
    Image.fromarray(stripe).save(root / "a.png")
    red = np.zeros((6, 9, 3), dtype=np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(root / "b.BMP")
    Image.new("RGB", (10, 14), (30, 200, 90)).save(sub / "c.JPG", quality=100)
    gradient = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    Image.fromarray(gradient).save(sub / "d.png")
    (root / "notes.txt").write_text("not an image")


def test_image_folder_loads_sorted_cropped_converted(tmp_path):
    _write_folder(tmp_path)
    ds = image_folder(tmp_path, size=4, channels=3)
    assert ds.images.shape == (4, 3, 4, 4) and ds.images.dtype == torch.float32
    assert ds.name == tmp_path.name
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert torch.all(ds.images[0] == 1)  # a.png: the white stripe, grey -> RGB replicated
    torch.testing.assert_close(ds.images[1], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 4, 4),
                               rtol=0, atol=0)  # b.BMP: pure red
    jpeg_colour = torch.tensor([30, 200, 90]).view(3, 1, 1) / 127.5 - 1
    assert (ds.images[2] - jpeg_colour).abs().max() <= 3 * QUANT  # sub/c.JPG, lossy
    # sub/d.png: 16×16 horizontal ramp -> 4×4 stays a left-to-right ramp, identical in every row
    ramp = ds.images[3, 0]
    assert torch.all(ramp[:, 1:] > ramp[:, :-1]) and torch.equal(ramp, ramp[:1].expand(4, 4))

    grey = image_folder(tmp_path, size=4, channels=1)
    assert grey.images.shape == (4, 1, 4, 4)
    luma = round(255 * 299 / 1000) / 127.5 - 1  # ITU-R 601 luma of pure red, as Pillow's "L"
    assert (grey.images[1] - luma).abs().max() <= QUANT


def test_image_folder_leaves_hidden_files_and_folders_out(tmp_path):
    # a notebook's checkpoint copy and a macOS AppleDouble file (not even an image) are not samples
    Image.new("L", (4, 4), 255).save(tmp_path / "a.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("L", (4, 4), 0).save(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    ds = image_folder(tmp_path, size=4, channels=1)
    assert ds.images.shape == (1, 1, 4, 4) and torch.all(ds.images == 1)


def test_image_folder_turns_images_upright_by_exif_orientation(tmp_path):
    # 6 wide x 2 high, left half black, right half white, tagged "rotate 90 CW to view"
    # (orientation 6): viewers show a 2 wide x 6 high image, black on top
    pixels = np.zeros((2, 6), dtype=np.uint8)
    pixels[:, 3:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    with Image.open(tmp_path / "photo.png") as im:
        assert im.getexif()[0x0112] == 6 and im.size == (6, 2)
    # centre crop of the upright 2x6 image: rows 2..3, the top one black, the bottom one white
    ds = image_folder(tmp_path, size=2, channels=1)
    assert torch.equal(ds.images[0, 0], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="path=.*missing.*does not exist"):
        image_folder(tmp_path / "missing", size=4)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        image_folder(tmp_path / "file.png", size=4)
    empty = tmp_path / "empty"
    (empty / "deeper").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        image_folder(empty, size=4)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("L", (4, 4)).save(bad / "good.png")
    (bad / "broken.png").write_bytes(b"this is not a png file")
    with pytest.raises(ValueError, match="broken.png"):
        image_folder(bad, size=4)
    with pytest.raises(ValueError, match="channels"):
        image_folder(bad, size=4, channels=2)
    with pytest.raises(ValueError, match="size"):
        image_folder(bad, size=0)


# ---- PNG grids -----------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_save_read_round_trip(tmp_path, channels):
    gen = torch.Generator().manual_seed(channels)
    x = torch.rand(1, channels, 5, 7, generator=gen) * 2.4 - 1.2  # some values need clamping
    path = tmp_path / "one.png"
    save_image_grid(x, path, padding=0)
    back = read_image(path, channels=channels)
    assert back.shape == (channels, 5, 7) and back.dtype == torch.float32
    assert (back - x[0].clamp(-1, 1)).abs().max() <= QUANT / 2 + 1e-6
    save_image_grid(x[0], tmp_path / "single.png", padding=0)  # (C, H, W) accepted
    assert torch.equal(read_image(tmp_path / "single.png", channels=channels), back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "single.png"]


def test_save_image_grid_layout(tmp_path):
    x = torch.linspace(-0.9, 0.9, 5).view(5, 1, 1, 1).expand(5, 1, 4, 3).contiguous()
    path = tmp_path / "grid.png"
    save_image_grid(x, path, nrow=2, padding=1)
    grid = read_image(path)[0]
    assert grid.shape == (3 * 5 + 1, 2 * 4 + 1)
    mask = torch.zeros_like(grid, dtype=torch.bool)
    for i in range(5):
        top, left = 1 + (i // 2) * 5, 1 + (i % 2) * 4
        assert (grid[top:top + 4, left:left + 3] - x[i, 0]).abs().max() <= QUANT / 2 + 1e-6
        mask[top:top + 4, left:left + 3] = True
    assert torch.all(grid[~mask] == -1)  # padding and the empty sixth cell
    save_image_grid(x, path)  # overwrite; default nrow = ceil(sqrt(5)) = 3
    assert read_image(path).shape == (1, 2 * 5 + 1, 3 * 4 + 1)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    save_image_grid(x, path, nrow=2, padding=1, scale=3)  # each pixel a 3x3 block
    big = read_image(path)[0]
    assert big.shape == (3 * grid.shape[0], 3 * grid.shape[1])
    assert torch.equal(big, grid.repeat_interleave(3, 0).repeat_interleave(3, 1))
    with pytest.raises(ValueError, match="scale"):
        save_image_grid(x, path, scale=0)


def test_save_image_grid_errors_write_nothing(tmp_path, monkeypatch):
    path = tmp_path / "out" / "grid.png"
    for bad, err, match in [(torch.zeros(4, 4), ValueError, r"\(4, 4\)"),
                            (torch.zeros(2, 2, 4, 4), ValueError, r"C in \(1, 3\)"),
                            (torch.zeros(1, 1, 4, 4, dtype=torch.uint8), TypeError, "floating"),
                            (torch.full((1, 1, 2, 2), float("nan")), ValueError, "NaN"),
                            ([[0.0]], TypeError, "images")]:
        with pytest.raises(err, match=match):
            save_image_grid(bad, path)
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(torch.zeros(1, 1, 2, 2), path, nrow=0)
    with pytest.raises(ValueError, match="padding"):
        save_image_grid(torch.zeros(1, 1, 2, 2), path, padding=-1)
    assert not path.parent.exists()

    # a write that fails halfway leaves the old file intact and no temporary file behind
    save_image_grid(torch.ones(1, 1, 2, 2), path, padding=0)
    original = path.read_bytes()

    def failing_save(self, fp, format=None, **params):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_image_grid(-torch.ones(1, 1, 2, 2), path, padding=0)
    assert path.read_bytes() == original
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]


def test_read_image_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(ValueError, match="channels"):
        read_image(tmp_path / "junk.png", channels=4)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_read_image_refuses_to_drop_colour(tmp_path, mode):
    # a colour picture read as one channel would come back grey with no word; a grey picture
    # stored as RGB (every pixel r == g == b) loses nothing and is read
    from PIL import Image
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(colour, "RGB").convert(mode).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png.*colour"):
        read_image(tmp_path / "colour.png", channels=1)
    assert read_image(tmp_path / "colour.png", channels=3).shape == (3, 6, 5)
    if mode == "P":  # a palette of greys (converting RGB to "P" would dither in colours)
        grey_file = Image.fromarray(colour[..., 0], "P")
        grey_file.putpalette([v for level in range(256) for v in (level,) * 3])
    else:
        grey_file = Image.fromarray(np.repeat(colour[..., :1], 3, axis=2), "RGB").convert(mode)
    grey_file.save(tmp_path / "grey.png")
    back = read_image(tmp_path / "grey.png", channels=1)
    assert torch.equal(back[0], torch.from_numpy(colour[..., 0]).float() / 127.5 - 1)


# ---- Gaussian mixture ----------------------------------------------------------------------

def _log_density(gmm: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p_σ(x) for x (B, D) float64, straight from the definition."""
    var = gmm.std ** 2 + sigma ** 2
    means = gmm.means.reshape(gmm.means.shape[0], -1)
    d = means.shape[1]
    sq_dist = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    log_normal = -sq_dist / (2 * var) - d / 2 * math.log(2 * math.pi * var)
    return torch.logsumexp(log_normal, dim=1) - math.log(means.shape[0])


def test_posterior_mean_1d_against_quadrature():
    # one mean under the sign group: components at ±0.6, plus a plain two-component mixture
    for gmm in (GaussianMixture(torch.tensor([[0.6]]), std=0.3, group="sign"),
                GaussianMixture(torch.tensor([[-0.7], [0.4]]), std=0.25)):
        grid = torch.linspace(-6, 6, 120001, dtype=torch.float64)
        prior = sum(torch.exp(-(grid - m) ** 2 / (2 * gmm.std ** 2)) for m in gmm.means[:, 0])
        x = torch.tensor([[-1.3], [-0.2], [0.0], [0.35], [2.0]], dtype=torch.float64)
        for sigma in (0.05, 0.5, 1.5):
            like = torch.exp(-(x - grid) ** 2 / (2 * sigma ** 2))  # (5, grid)
            expected = torch.trapezoid(prior * like * grid, grid) / torch.trapezoid(prior * like, grid)
            got = gmm.posterior_mean(x, sigma)[:, 0]
            assert (got - expected).abs().max() <= 1e-9, (gmm, sigma)
    sign_gmm = GaussianMixture(torch.tensor([[0.6]], dtype=torch.float64), std=0.3, group="sign")
    assert sorted(sign_gmm.means[:, 0].tolist()) == [-0.6, 0.6] and sign_gmm.shape == (1,)
    x = torch.tensor([[-0.4], [0.1], [0.9]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: sign_gmm.posterior_mean(v, 0.3), (x,))


def test_posterior_mean_equivariant_under_d4():
    gmm = gaussian_mixture("d4", size=8, components=3, std=0.2, seed=1)
    assert gmm.means.shape == (24, 1, 8, 8) and gmm.means.dtype == torch.float64
    assert gmm.means.min() >= -1 and gmm.means.max() <= 1
    group = groups.get("d4")
    gen = torch.Generator().manual_seed(2)
    x = gmm.sample(16, seed=2).double() + 0.3 * torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    sigma = torch.linspace(0.1, 1.0, 16)
    base = gmm.posterior_mean(x, sigma)
    for k in range(len(group)):
        assert rel_err(gmm.posterior_mean(group.act(x, k), sigma), group.act(base, k)) <= 1e-6
    # without the orbit the same check fails, so it has power
    plain = gaussian_mixture(None, size=8, components=3, std=0.2, seed=1)
    assert plain.means.shape == (3, 1, 8, 8)
    assert rel_err(plain.posterior_mean(group.act(x, 1), sigma),
                   group.act(plain.posterior_mean(x, sigma), 1)) > 1e-2


def test_posterior_mean_dtype_sigma_forms_and_limits():
    gmm = gaussian_mixture("c4", size=6, channels=2, components=2, std=0.15, seed=3)
    x = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.0, 0.2, 0.5, 1.0, 3.0])
    out = gmm.posterior_mean(x, sigma)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for i in range(5):
        row = gmm.posterior_mean(x[i:i + 1].double(), float(sigma[i]))
        assert rel_err(out[i:i + 1], row) <= 1e-6
    torch.testing.assert_close(gmm.posterior_mean(x, 0.0), x, rtol=0, atol=1e-7)  # σ = 0: x itself
    far = gmm.posterior_mean(x.double(), 1e4)  # huge noise: the prior mean
    assert rel_err(far, gmm.means.mean(0).expand(5, 2, 6, 6)) <= 1e-6
    with pytest.raises(ValueError, match=r"x must have shape.*\(5, 6, 6\)"):
        gmm.posterior_mean(torch.zeros(5, 6, 6), 0.1)
    with pytest.raises(ValueError, match=r"sigma.*\(5,\).*\(4,\)"):
        gmm.posterior_mean(x, torch.ones(4))
    with pytest.raises(ValueError, match="sigma"):
        gmm.posterior_mean(x, -0.1)
    with pytest.raises(TypeError, match="x must"):
        gmm.posterior_mean(torch.zeros(5, 2, 6, 6, dtype=torch.int64), 0.1)


def test_score_matches_autograd_of_log_density():
    gmm = gaussian_mixture("d4", size=4, components=2, std=0.3, seed=4)
    gen = torch.Generator().manual_seed(5)
    for sigma in (0.0, 0.2, 1.0):
        x = torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
        _log_density(gmm, x.reshape(6, -1), sigma).sum().backward()
        score = gmm.score(x, sigma)
        assert score.dtype == torch.float64
        assert rel_err(score, x.grad) <= 1e-10
        if sigma > 0:
            pm = gmm.posterior_mean(x, sigma)
            assert rel_err(score, (pm - x.detach()) / sigma ** 2) <= 1e-10


def test_sample_moments_and_dataset():
    gmm = gaussian_mixture("d4", size=8, components=2, std=0.1, seed=6)
    n = 40000
    samples = gmm.sample(n, seed=7)
    assert samples.shape == (n, 1, 8, 8) and samples.dtype == torch.float32
    assert torch.equal(samples, gmm.sample(n, seed=7))
    assert not torch.equal(samples[:10], gmm.sample(10, seed=8))
    mixture_mean = gmm.means.mean(0)
    mixture_var = gmm.std ** 2 + gmm.means.var(0, unbiased=False)
    standard_error = (mixture_var / n).sqrt()
    z = (samples.double().mean(0) - mixture_mean) / standard_error
    assert z.abs().max() <= 5
    sample_var = samples.double().var(0)
    assert ((sample_var - mixture_var) / mixture_var).abs().max() <= 0.1
    # every sample lies within a few std of its nearest component
    dist = torch.cdist(samples[:2000].double().reshape(2000, -1), gmm.means.reshape(16, -1))
    assert dist.min(1).values.max() <= gmm.std * (math.sqrt(64) + 5)

    ds = gmm.dataset(10, seed=7)
    assert isinstance(ds, ImageTensorDataset) and ds.name == "gmm" and ds.shape == (1, 8, 8)
    assert torch.equal(ds.images, gmm.sample(10, seed=7))
    vectors = GaussianMixture(torch.tensor([[0.0, 1.0, 2.0]]), std=0.5, group=groups.cyclic(3))
    assert vectors.means.shape == (3, 3) and vectors.sample(4).shape == (4, 3)
    with pytest.raises(ValueError, match="image-shaped"):
        vectors.dataset(4)


def test_gaussian_mixture_errors():
    with pytest.raises(ValueError, match="std"):
        GaussianMixture(torch.zeros(2, 3), std=0.0)
    with pytest.raises(ValueError, match=r"means.*\(3,\)"):
        GaussianMixture(torch.zeros(3), std=0.1)
    with pytest.raises(TypeError, match="means"):
        GaussianMixture([[0.0]], std=0.1)
    with pytest.raises(ValueError, match=r"means.*square"):
        GaussianMixture(torch.zeros(2, 1, 3, 4), std=0.1, group="d4")
    with pytest.raises(ValueError, match="unknown group"):
        gaussian_mixture("d8")
    with pytest.raises(ValueError, match="components"):
        gaussian_mixture(components=0)
    with pytest.raises(ValueError, match="n must"):
        gaussian_mixture().sample(0)


def test_files_written_atomically_get_the_usual_mode(tmp_path):
    """Not mkstemp's 0600: 0666 less the umask, as open() would give (users share results)."""
    import os
    from symfast._io import atomic_write_text
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(mask)


def test_a_16_bit_grey_png_is_rescaled_not_clipped(tmp_path):
    """Pillow's I;16 -> L conversion clips at 255: every pixel of a 16-bit grey PNG read white."""
    values = np.array([[1000, 32768], [65535, 0]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    got = read_image(tmp_path / "deep.png", channels=1)[0]
    want = torch.from_numpy(np.round(values / 65535 * 255)).float() / 127.5 - 1
    assert torch.equal(got, want)


def test_files_whose_pixels_cannot_be_kept_are_refused_by_name(tmp_path):
    """A float TIFF of [0, 1] and a 32-bit TIFF of 0..255 read near black (Pillow clips them to
    "L"); a stroke drawn on transparent pixels vanished with the alpha (for one image and in a
    training folder)."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 4)).astype(np.uint8)
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tiff")
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "wide.tiff")
    stroke = np.zeros((4, 4, 2), dtype=np.uint8)
    stroke[1, :, 1] = 255  # a black stroke; the rest black and transparent
    Image.fromarray(stroke, "LA").save(tmp_path / "stroke.png")
    palette = Image.fromarray(grey, "L").convert("P")
    palette.save(tmp_path / "palette.png", transparency=int(np.asarray(palette)[0, 0]))
    for name, match in (("float.tiff", "floating-point"), ("wide.tiff", "32-bit integer"),
                        ("stroke.png", "transparent"), ("palette.png", "transparent")):
        with pytest.raises(ValueError, match=f"{name}.*{match}"):
            read_image(tmp_path / name)
        if not name.endswith(".png"):
            continue  # image_folder reads PNG, JPEG, BMP and WebP files
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        (folder / name).write_bytes((tmp_path / name).read_bytes())
        with pytest.raises(ValueError, match=f"{name}.*{match}"):
            image_folder(folder, size=4)
    opaque = np.concatenate([grey[..., None], np.full((4, 4, 1), 255, np.uint8)], axis=2)
    Image.fromarray(opaque, "LA").save(tmp_path / "opaque.png")  # alpha present, all opaque
    assert torch.equal(read_image(tmp_path / "opaque.png")[0], torch.from_numpy(grey).float() / 127.5 - 1)


def test_a_mixture_group_must_act_on_the_components_not_across_them():
    with pytest.raises(ValueError, match="at least 2 dims for group d4"):
        GaussianMixture(torch.zeros(2, 2), 0.5, "d4")  # d4 would turn the (K, D) matrix
    with pytest.raises(ValueError, match="at least 2 dims for group flip_v"):
        GaussianMixture(torch.zeros(1, 3), 0.5, "flip_v")
    assert GaussianMixture(torch.zeros(2, 3, 3), 0.5, "d4").means.shape == (16, 3, 3)


def test_noisy_dataset_is_a_sequence():
    from symfast.data import NoisyDataset
    clean = ImageTensorDataset(torch.zeros(3, 1, 2, 2))
    noisy = NoisyDataset(clean, 0.5)
    assert len(list(noisy)) == 3 and torch.equal(noisy[-1], noisy[2])
    with pytest.raises(IndexError):
        noisy[3]


@pytest.mark.parametrize("seed", [1.5, None, 2**64, -2**63 - 1, True])
def test_seeded_data_names_a_bad_seed(seed):
    from symfast.data import clean_split, synthetic_audio, topic_dataset
    for make in (lambda: gaussian_mixture("d4", seed=seed), lambda: clean_split(10, 0.5, seed=seed),
                 lambda: topic_dataset(4, 20, m=2, seed=seed),
                 lambda: synthetic_audio(1, 8000, 0.05, seed=seed)):
        with pytest.raises((TypeError, ValueError), match="seed must be an int"):
            make()


def test_mixture_sigma_as_a_tensor_is_checked_as_a_float_is():
    mixture = gaussian_mixture("d4", size=4, seed=0)
    x = torch.zeros(2, 1, 4, 4)
    for bad in (torch.tensor(-0.1), torch.tensor(math.nan), torch.tensor([0.1, math.inf])):
        with pytest.raises(ValueError, match="sigma must be non-negative and finite"):
            mixture.score(x, bad)
    assert torch.equal(mixture.score(x, torch.tensor(0.5)), mixture.score(x, 0.5))
