"""Image data: scikit-learn's bundled digits, a loader for a folder of image files, orbit
augmentation, PNG grids, and a G-invariant Gaussian mixture whose posterior mean is exact.

Every dataset is an :class:`ImageTensorDataset`: float32 images (N, C, H, W) in [-1, 1]. Nothing
here downloads anything; scikit-learn and Pillow are imported only by the functions that need them.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from symfast import groups as _groups
from symfast._io import atomic_path
from symfast.data._paths import is_hidden
from symfast.ops import _checks
from symfast.philox import seeded_generator

IMAGE_SUFFIXES = (".png", ".jpeg", ".jpg", ".bmp", ".webp")
_PIL_MODES = {1: "L", 3: "RGB"}


class ImageTensorDataset(torch.utils.data.Dataset):
    """A stack of images held in memory.

    Args:
        images: (N, C, H, W) floating tensor, N >= 1, values in [-1, 1] by convention (not checked:
            a Gaussian mixture's samples may leave it). Stored as ``images.float().contiguous()``.
        name: a short name, used for derived datasets and logs.
        labels: optional (N,) integer tensor, stored as int64 in ``labels``.
    """

    def __init__(self, images: torch.Tensor, name: str = "images",
                 labels: torch.Tensor | None = None):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a 4-d floating tensor (N, C, H, W), got shape "
                             f"{tuple(images.shape)} and dtype {images.dtype}")
        if images.shape[0] < 1:
            raise ValueError(f"images must hold at least one image, got shape {tuple(images.shape)}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dim() != 1 \
                    or labels.shape[0] != images.shape[0] or labels.is_floating_point():
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},), "
                                 f"got {got}")
            labels = labels.detach().long().contiguous()
        self.images = images.detach().float().contiguous()
        self.name = name
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image i: (C, H, W)."""
        return self.images[i]

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (B,) int64 -> images (B, C, H, W), gathered with one index_select."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 \
                or indices.dtype not in (torch.int64, torch.int32):
            got = (f"shape {tuple(indices.shape)} dtype {indices.dtype}"
                   if isinstance(indices, torch.Tensor) else type(indices).__name__)
            raise TypeError(f"indices must be a 1-d int64 tensor (B,), got {got}")
        return self.images.index_select(0, indices.to(self.images.device))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """H (== W); raises ValueError for non-square images."""
        _, h, w = self.shape
        if h != w:
            raise ValueError(f"dataset {self.name!r} has non-square images (H, W) = ({h}, {w}); "
                             f"image_size needs H == W, use .shape instead")
        return h

    def __repr__(self) -> str:
        labelled = ", labelled" if self.labels is not None else ""
        return f"ImageTensorDataset({self.name!r}, N={len(self)}, shape={self.shape}{labelled})"


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# ---- digits --------------------------------------------------------------------------------

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None
# The smallest sizes digits(mode="resize") and gaussian_mixture() make (symfast train checks
# its image_size against them).
DIGITS_MIN_SIZE = 4
GAUSSIAN_MIXTURE_MIN_SIZE = 2


def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits, loaded once: ((1797, 1, 8, 8) float32 in [-1, 1], labels)."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits
        bunch = load_digits()
        images = torch.from_numpy(bunch.images).float().div(8.0).sub(1.0).unsqueeze(1)
        _DIGITS = (images.contiguous(), torch.from_numpy(bunch.target).long())
    return _DIGITS


DIGITS_TRAIN = 1500  # split="train": the first 1500 digits; split="test": the other 297


def digits(size: int = 16, mode: str = "resize", split: str | None = None) -> ImageTensorDataset:
    """scikit-learn's 8×8 digits (1,797 images, bundled with the package, no download), values
    0..16 mapped to [-1, 1] by x/8 − 1. Returns images (1797, 1, size, size) and ``labels`` (1797,).
    ``split``: None (all), "train" (the first 1500) or "test" (the other 297, held out by the
    shipped models and the evaluation).

    mode="resize": bilinear resampling (antialiased when size < 8), clamped to [-1, 1]; size must be
    an int >= 4, and size 8 gives the raw images. mode="pad": the raw image centred on a size×size
    canvas of −1; size must be >= 8 with size − 8 even.
    """
    if mode not in ("resize", "pad"):
        raise ValueError(f"mode must be 'resize' or 'pad', got {mode!r}")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    _check_int("size", size, DIGITS_MIN_SIZE if mode == "resize" else 8)
    raw, labels = _raw_digits()
    if split is not None:
        part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
        raw, labels = raw[part], labels[part]
    if size == 8:
        images = raw.clone()
    elif mode == "resize":
        images = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=size < 8).clamp_(-1.0, 1.0)
    else:
        if (size - 8) % 2:
            raise ValueError(f"size must be 8 plus an even number for mode='pad', got {size}")
        images = F.pad(raw, [(size - 8) // 2] * 4, value=-1.0)
    return ImageTensorDataset(images, name=f"digits{size}" + (f"-{split}" if split else ""),
                              labels=labels.clone())


# ---- orbit augmentation --------------------------------------------------------------------

def orbit_augmented(dataset: ImageTensorDataset, group: _groups.Group | str) -> ImageTensorDataset:
    """Every image under every group element, sample-major: row i·|G| + k is g_k x_i, so the
    empirical distribution is exactly G-invariant. (N, C, H, W) -> (N·|G|, C, H, W); labels are
    repeated the same way; the name becomes f"{dataset.name}-{group.name}"."""
    if not isinstance(dataset, ImageTensorDataset):
        raise TypeError(f"dataset must be an ImageTensorDataset, got {type(dataset).__name__}")
    group = _groups.get(group)
    images = dataset.images
    group.check_input(images, "dataset")
    augmented = torch.stack([group.act(images, k) for k in range(len(group))], dim=1)
    labels = dataset.labels
    if labels is not None:
        labels = labels.repeat_interleave(len(group))
    return ImageTensorDataset(augmented.reshape(-1, *images.shape[1:]),
                              name=f"{dataset.name}-{group.name}", labels=labels)


# ---- files ---------------------------------------------------------------------------------

class ImageRefused(ValueError):
    """A file Pillow reads whose pixels cannot be turned into the asked image without losing or
    inventing something (its message says what; not wrapped as a read error)."""


def _has_colour(im) -> bool:
    """Whether a PIL image has pixels whose red, green and blue differ (an "RGB" file of a grey
    picture has none)."""
    if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;"):
        return False
    import numpy as np
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def _has_transparent_pixels(im) -> bool:
    if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in im.info:
        return False
    import numpy as np
    return bool((np.asarray(im.convert("RGBA"))[..., 3] < 255).any())


def _open_image(path: Path, channels: int, refuse_colour: bool = False):
    """A PIL image of ``path``, upright by its EXIF orientation, converted to "L" (channels 1) or
    "RGB" (channels 3), fully loaded. ``refuse_colour``: a ValueError instead of converting an
    image whose colour channels differ to grey (the colour would be lost). Refused always:
    transparent pixels (dropping alpha shows what lies under them: a stroke drawn on a
    transparent background vanished), floating-point files and 32-bit integer files other than
    PNG's 16-bit grey (no defined value range: Pillow's conversion clipped them near black)."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            file_format = im.format
            # a camera's JPEG stores the sensor's pixels and says how to turn them in EXIF;
            # viewers (and diffusers' load_image) show the turned image
            im = ImageOps.exif_transpose(im)
            sixteen_bit = im.mode.startswith("I;16") or (im.mode == "I" and file_format == "PNG")
            if im.mode in ("F", "I") and not sixteen_bit:
                kind = "floating-point" if im.mode == "F" else "32-bit integer"
                raise ImageRefused(f"image file {str(path)!r} holds {kind} pixels (mode {im.mode}), "
                               f"whose value range is not defined; save it as an 8- or 16-bit "
                               f"image")
            if _has_transparent_pixels(im):
                raise ImageRefused(f"image file {str(path)!r} has transparent pixels, which an image "
                               f"without alpha cannot keep; flatten it onto a background first")
            if sixteen_bit:
                # 16-bit grey ("I;16", or "I" holding 0..65535): Pillow's conversion to "L"
                # clips at 255 (every pixel white); rescale to 8 bits first
                import numpy as np
                wide = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
                im = Image.fromarray(np.clip(np.round(wide), 0, 255).astype(np.uint8), "L")
            if refuse_colour and channels == 1 and _has_colour(im):
                raise ImageRefused(f"image file {str(path)!r} is in colour (mode {im.mode}) and "
                               f"would lose its colour as a 1-channel image; convert it to "
                               f"grey first if that is what you want")
            return im.convert(_PIL_MODES[channels])
    except ImageRefused:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image file {str(path)!r} with Pillow: {exc}") from exc


def _pil_to_tensor(im) -> torch.Tensor:
    """An "L" or "RGB" PIL image -> (C, H, W) float32 in [-1, 1] (x/127.5 − 1)."""
    import numpy as np
    pixels = torch.from_numpy(np.array(im, dtype=np.uint8))
    pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    return pixels.float().div(127.5).sub(1.0).contiguous()


def _check_channels(channels) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels not in _PIL_MODES:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def image_folder(path: str | os.PathLike, size: int, channels: int = 3) -> ImageTensorDataset:
    """Every PNG/JPEG/JPG/BMP/WEBP file below ``path`` (recursively, suffix case-insensitive,
    hidden files and folders, whose name starts with ".", left out), sorted by relative path,
    turned upright by its EXIF orientation tag (as cameras and phones write them), converted to grey (channels 1) or RGB (channels 3), centre-cropped
    to a square, resized to size×size (bicubic) and mapped to [-1, 1] by x/127.5 − 1.

    Returns images (N, channels, size, size); the name is the folder's name.
    """
    from PIL import Image
    _check_int("size", size, 1)
    _check_channels(channels)
    root = Path(path)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise ValueError(f"path={str(root)!r} {what}; expected a folder of images")
    files = sorted((p for p in root.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p, root)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"path={str(root)!r} holds no image files (suffixes {IMAGE_SUFFIXES})")
    images = []
    for file in files:
        im = _open_image(file, channels)
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((size, size), resample=Image.Resampling.BICUBIC)
        images.append(_pil_to_tensor(im))
    return ImageTensorDataset(torch.stack(images), name=root.resolve().name or "images")


def check_png_path(path: str | os.PathLike, name: str = "out") -> None:
    """ValueError naming ``name`` unless ``path`` is a .png file path (not a folder): the grids
    are PNGs, and a folder-like path would become a file of that name."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or Path(text).is_dir() or Path(text).suffix.lower() != ".png":
        raise ValueError(f"{name}={text!r} must be the path of a .png file")


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    padding: int = 1, scale: int = 1) -> None:
    """Write images (B, C, H, W) or one image (C, H, W), C in (1, 3), values in [-1, 1], as one PNG
    grid, atomically (a reader sees the old file or the new one).

    ``nrow`` images per row (default ceil(sqrt(B))); ``padding`` pixels of −1 (black) around and
    between the images, as in torchvision's make_grid; unused cells of the last row are black too.
    Values are clamped to [-1, 1] and stored as round((x + 1)·127.5). ``scale``: enlarge the grid
    by this integer factor, each pixel a scale×scale block (for viewing small images).
    """
    from PIL import Image
    check_png_path(path, "path")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in _PIL_MODES or images.shape[0] < 1:
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W) with C in (1, 3) and B >= 1, "
                         f"got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating tensor in [-1, 1], got dtype {images.dtype}")
    if torch.isnan(images).any():
        raise ValueError("images contain NaN")
    b, c, h, w = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(b))
    _check_int("nrow", nrow, 1)
    _check_int("padding", padding, 0)
    _check_int("scale", scale, 1)
    rows = math.ceil(b / nrow)
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding,
                       dtype=torch.uint8)
    pixels = ((images.detach().cpu().double().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    for i in range(b):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).contiguous().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def read_image(path: str | os.PathLike, channels: int = 1) -> torch.Tensor:
    """One image file -> (channels, H, W) float32 in [-1, 1] (x/127.5 − 1), no resizing: the
    inverse of :func:`save_image_grid` for one image written with padding=0. A grey file read
    with ``channels=3`` repeats its grey; a colour file read with ``channels=1`` is refused
    (ValueError) unless its red, green and blue are equal everywhere, since its colour would be
    lost."""
    _check_channels(channels)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not an existing file")
    return _pil_to_tensor(_open_image(path, channels, refuse_colour=True))


# ---- Gaussian mixture with an exact posterior mean -----------------------------------------

class GaussianMixture:
    """An equal-weight mixture of isotropic Gaussians N(μ_m, std² I), m = 1..M.

    Args:
        means: (K, *shape) component means (at least one event dim).
        std: the components' standard deviation s > 0.
        group: a Group or group name; if given, the components are the orbit of ``means`` under
            it, block k holding g_k μ (M = K·|G|), which makes the distribution exactly
            G-invariant. The group acts on the trailing dims of ``shape``.

    Attributes: ``means`` (M, *shape) float64, ``std``, ``shape``.
    """

    def __init__(self, means: torch.Tensor, std: float, group: _groups.Group | str | None = None):
        if not isinstance(means, torch.Tensor):
            raise TypeError(f"means must be a torch.Tensor (K, *shape), got {type(means).__name__}")
        if means.dim() < 2 or means.shape[0] < 1 or means.numel() == 0:
            raise ValueError(f"means must be (K, *shape) with K >= 1 and at least one event dim, "
                             f"got shape {tuple(means.shape)}")
        _checks.finite_number("std", std, positive=True)
        means = means.detach().cpu().double()
        if not torch.isfinite(means).all():
            raise ValueError("means contain NaN or inf")
        if group is not None:
            group = _groups.get(group)
            if means.dim() - 1 < group.event_ndim:  # it would act across the component axis K
                raise ValueError(f"means must be (K, *shape) with shape having at least "
                                 f"{group.event_ndim} dims for group {group.name}, got shape "
                                 f"{tuple(means.shape)}")
            group.check_input(means[0], "means[k]")
            means = torch.cat([group.act(means, k) for k in range(len(group))])
        self.means = means.contiguous()
        self.std = float(std)
        self.shape = tuple(means.shape[1:])
        self.group = group

    def __repr__(self) -> str:
        group = f", group={self.group.name!r}" if self.group is not None else ""
        return (f"GaussianMixture(components={self.means.shape[0]}, shape={self.shape}, "
                f"std={self.std}{group})")

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n samples (n, *shape) float32: a uniform component, then mean + std·N(0, I)."""
        _check_int("n", n, 1)
        gen = seeded_generator(seed)
        component = torch.randint(self.means.shape[0], (n,), generator=gen)
        noise = torch.randn((n, *self.shape), generator=gen, dtype=torch.float64)
        return (self.means[component] + self.std * noise).float()

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating torch.Tensor (B, *{self.shape}), got {got}")
        if x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (B, *{self.shape}), got {tuple(x.shape)}")

    def _sigma2(self, sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """σ² as a float64 (B, 1) or (1, 1) tensor on x's device."""
        if isinstance(sigma, torch.Tensor):
            if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] != x.shape[0]):
                raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},), "
                                 f"got shape {tuple(sigma.shape)}")
            sigma = sigma.to(x.device, torch.float64)
            # as for a float: a negative σ was squared into a positive one, NaN came out as NaN
            if not bool(((sigma >= 0) & (sigma < math.inf)).all()):
                raise ValueError(f"sigma must be non-negative and finite, got {sigma.tolist()}")
            return sigma.reshape(-1, 1).square()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < math.inf:
            raise ValueError(f"sigma must be a non-negative finite float or a tensor, got {sigma!r}")
        return torch.full((1, 1), float(sigma) ** 2, dtype=torch.float64, device=x.device)

    def _score64(self, x: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
        """The score of p_σ = p * N(0, σ²I) at x, (B, D) float64:
        Σ_k r_k (μ_k − x)/(s² + σ²), r_k ∝ exp(−‖x − μ_k‖²/(2(s² + σ²)))."""
        means = self.means.to(x.device).reshape(self.means.shape[0], -1)
        var = self.std ** 2 + sigma2
        # ‖x − μ_k‖² = ‖x‖² − 2 x·μ_k + ‖μ_k‖², and ‖x‖² is the same for every k: it drops out of r
        logits = (2.0 * x @ means.T - means.square().sum(1)) / (2.0 * var)
        resp = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))
        return (resp @ means - x) / var

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """∇ log p_σ(x) = (posterior_mean(x, σ) − x)/σ², exact. x: (B, *shape); sigma: scalar or
        (B,); returned like x (dtype and shape). Also defined at σ = 0 (the data's own score)."""
        self._check_x(x)
        sigma2 = self._sigma2(sigma, x)
        score = self._score64(x.reshape(x.shape[0], -1).double(), sigma2)
        return score.reshape(x.shape).to(x.dtype)

    def posterior_mean(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The exact E[x0 | x0 + σ ε = x] = Σ_k r_k (μ_k + s²/(s² + σ²)(x − μ_k)), computed in
        float64 (differentiable in x). x: (B, *shape); sigma: scalar or (B,); returned like x
        (dtype and shape)."""
        self._check_x(x)
        sigma2 = self._sigma2(sigma, x)
        flat = x.reshape(x.shape[0], -1).double()
        return (flat + sigma2 * self._score64(flat, sigma2)).reshape(x.shape).to(x.dtype)

    def dataset(self, n: int, seed: int = 0) -> ImageTensorDataset:
        """n samples as an ImageTensorDataset named "gmm" (needs image-shaped components (C, H, W);
        values are not clamped)."""
        if len(self.shape) != 3:
            raise ValueError(f"dataset() needs image-shaped components (C, H, W), got shape {self.shape}")
        return ImageTensorDataset(self.sample(n, seed), name="gmm")


def _blob_means(components: int, channels: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(components, channels, size, size) smooth images in [-1, 1]: three Gaussian blobs per
    channel on a −1 background, scaled so each image's brightest pixel is 1."""
    blobs = 3
    coord = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    centre = torch.rand(components, channels, blobs, 2, generator=gen, dtype=torch.float64)
    width = 0.08 + 0.15 * torch.rand(components, channels, blobs, generator=gen, dtype=torch.float64)
    height = 0.3 + 0.7 * torch.rand(components, channels, blobs, generator=gen, dtype=torch.float64)
    dy = coord[:, None] - centre[..., 0, None, None]  # (K, C, blobs, size, 1)
    dx = coord[None, :] - centre[..., 1, None, None]  # (K, C, blobs, 1, size)
    bumps = torch.exp(-(dy ** 2 + dx ** 2) / (2 * width[..., None, None] ** 2))
    field = (height[..., None, None] * bumps).sum(2)
    field = field / field.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * field - 1.0


def gaussian_mixture(group: _groups.Group | str | None = "d4", size: int = 8, channels: int = 1,
                     components: int = 4, std: float = 0.1, seed: int = 0) -> GaussianMixture:
    """A G-invariant mixture of images (channels, size, size): ``components`` seeded smooth blob
    images in [-1, 1] as base means, then their orbit under ``group`` (None: no symmetrisation),
    so components·|G| equal-weight components of standard deviation ``std``."""
    _check_int("size", size, GAUSSIAN_MIXTURE_MIN_SIZE)
    _check_int("channels", channels, 1)
    _check_int("components", components, 1)
    gen = seeded_generator(seed)
    return GaussianMixture(_blob_means(components, channels, size, gen), std, group=group)
