"""dSprites images: a procedural renderer faithful to the real frames, and the real archive.

The dSprites dataset (Matthey et al., 2017) holds every 64×64 binary image of a square, an
ellipse or a heart over a grid of latents, stored row-major in the order

    (color 1, shape 3, scale 6, orientation 40, posX 32, posY 32)       (posY fastest),

with scale = linspace(0.5, 1, 6), orientation = linspace(0, 2π, 40) radians and
posX, posY = linspace(0, 1, 32). Both image sources below are indexed by latent *class indices*
(shape, scale, orientation, posX, posY), so datasets drawn from either are interchangeable.

Rendering rules (measured on real frames): pixel (r, c) covers [c, c+1)×[r, r+1) with x to the
right and y downward and is on iff its centre (c+½, r+½) lies inside the shape (no
anti-aliasing). The sprite centre is (16 + 32·posX, 16 + 32·posY) px; the shape is rotated about
it counter-clockwise as displayed. At scale s: the square has side 19.2·s px; the ellipse
semi-axes 12.78·s × 7.23·s px (major axis horizontal at θ = 0); the heart is the curve
x = 16 sin³t, y = 13 cos t − 5 cos 2t − 2 cos 3t − cos 4t (y up), rescaled independently in x
and y to a 19.2·s × 19.2·s px box on the sprite centre and shifted 0.25·s px towards its tip (down
on screen at θ = 0; the shift is part of the shape, so it rotates and scales with it).
Over the 202 reference frames this renderer mismatches 122 of 52,952 "on" pixels (0.23 %).
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

#: latent names and sizes of the archive, in its row-major order
LATENT_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
LATENT_SIZES = (1, 3, 6, 40, 32, 32)
#: shape class indices
SQUARE, ELLIPSE, HEART = 0, 1, 2
IMAGE_SIZE = 64
ARCHIVE_NAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"

_SQUARE_HALF = 9.6  # half side at scale 1 (px)
_ELLIPSE_AXES = (12.78, 7.23)  # semi-axes at scale 1 (px)
_HEART_BOX = 19.2  # side of the heart's bounding box at scale 1 (px)
_HEART_SHIFT = 0.25  # towards the tip, at scale 1 (px)
_WINDOW = 32  # a sprite fits in a 32×32 px window around its centre (radius ≤ 13.8 px)


def scale_values() -> np.ndarray:
    """The 6 scale values, linspace(0.5, 1, 6)."""
    return np.linspace(0.5, 1.0, LATENT_SIZES[2])


def orientation_values() -> np.ndarray:
    """The 40 orientation values in radians, linspace(0, 2π, 40)."""
    return np.linspace(0.0, 2.0 * np.pi, LATENT_SIZES[3])


def position_values() -> np.ndarray:
    """The 32 position values, linspace(0, 1, 32) (posX and posY alike)."""
    return np.linspace(0.0, 1.0, LATENT_SIZES[4])


# --------------------------------------------------------------------------------- the heart
@functools.lru_cache(maxsize=1)
def _heart_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float, float]:
    """Boundary of the right half of the heart as functions of y (curve units, y up).

    On t ∈ [0, π] the curve starts at the notch (0, 5), rises to the top of the lobe at
    t* ≈ 0.908 (y ≈ 11.92), then descends monotonically to the tip (0, −17). So a horizontal
    line at height y meets the right half in the interval [x_in(y), x_out(y)], with
    x_in(y) = 0 below the notch (y ≤ 5) and the rising branch above it.
    """
    t = np.linspace(0.0, np.pi, 20001)
    x = 16.0 * np.sin(t) ** 3
    y = 13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t)
    k = int(np.argmax(y))
    rise_y, rise_x = y[: k + 1], x[: k + 1]  # increasing in y
    fall_y, fall_x = y[k:][::-1], x[k:][::-1]  # increasing in y after the flip
    return rise_y, rise_x, fall_y, fall_x, float(y[0]), float(y.min()), float(y.max())


def _inside_square(u: np.ndarray, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    half = _SQUARE_HALF * s
    return (np.abs(u) <= half) & (np.abs(v) <= half)


def _inside_ellipse(u: np.ndarray, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    a, b = _ELLIPSE_AXES
    return (u / (a * s)) ** 2 + (v / (b * s)) ** 2 <= 1.0


def _inside_heart(u: np.ndarray, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    rise_y, rise_x, fall_y, fall_x, notch, ymin, ymax = _heart_tables()
    side = _HEART_BOX * s
    X = np.abs(u) * (32.0 / side)  # curve x ∈ [−16, 16] spans the box width
    Y = (v + _HEART_SHIFT * s) * ((ymax - ymin) / side) + 0.5 * (ymax + ymin)
    x_out = np.interp(Y, fall_y, fall_x)
    x_in = np.where(Y > notch, np.interp(Y, rise_y, rise_x), 0.0)
    return (Y >= ymin) & (Y <= ymax) & (X <= x_out) & (X >= x_in)


# ------------------------------------------------------------------------------- the renderer
def render(
    shape: np.ndarray | Sequence[int] | int,
    scale: np.ndarray | Sequence[float] | float,
    orientation: np.ndarray | Sequence[float] | float,
    pos_x: np.ndarray | Sequence[float] | float,
    pos_y: np.ndarray | Sequence[float] | float,
    *,
    chunk: int = 2048,
) -> np.ndarray:
    """Render dSprites images from latent *values* (shape class, scale, radians, posX, posY).

    For each image, every pixel centre p = (c+½, r+½) of a 32×32 window around the sprite
    centre m is mapped to the shape's frame, (u, v) = R(−θ)·(p_x − m_x, m_y − p_y) (y flipped
    to point up, then rotated back by θ), and tested against the shape (see the module
    docstring). Vectorised over images and pixels, in chunks of ``chunk`` images.

    Args:
        shape: class indices (0 square, 1 ellipse, 2 heart), broadcast to the batch.
        scale, orientation, pos_x, pos_y: latent values, broadcast to the batch.
        chunk: images per vectorised block (bounds the memory to ~100 MB).

    Returns:
        ``uint8`` array ``[n, 64, 64]`` with values in {0, 1}.
    """
    arrays = np.broadcast_arrays(
        np.asarray(shape),
        np.asarray(scale, float),
        np.asarray(orientation, float),
        np.asarray(pos_x, float),
        np.asarray(pos_y, float),
    )
    sh, sc, th, px, py = (a.reshape(-1) for a in arrays)
    if sh.size and not np.isin(sh, (SQUARE, ELLIPSE, HEART)).all():
        raise ValueError(f"shape classes must be 0, 1 or 2, got {sorted(set(sh.tolist()))}")
    n = sh.size
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        _render_block(out[sl], sh[sl], sc[sl], th[sl], px[sl], py[sl])
    return out


def _render_block(
    out: np.ndarray, sh: np.ndarray, s: np.ndarray, th: np.ndarray, px: np.ndarray, py: np.ndarray
) -> None:
    w = _WINDOW
    cx = 16.0 + 32.0 * px
    cy = 16.0 + 32.0 * py
    c0 = np.clip(np.floor(cx).astype(int) - w // 2, 0, IMAGE_SIZE - w)
    r0 = np.clip(np.floor(cy).astype(int) - w // 2, 0, IMAGE_SIZE - w)
    ar = np.arange(w)
    cols = c0[:, None] + ar[None, :]  # [n, w]
    rows = r0[:, None] + ar[None, :]
    qx = (cols + 0.5 - cx[:, None])[:, None, :]  # [n, 1, w]
    qy = (cy[:, None] - (rows + 0.5))[:, :, None]  # [n, w, 1]  (y up)
    ct = np.cos(th)[:, None, None]
    st = np.sin(th)[:, None, None]
    u = ct * qx + st * qy  # R(−θ) q
    v = ct * qy - st * qx
    S = s[:, None, None]
    inside = np.zeros(u.shape, dtype=bool)
    for k, test in ((SQUARE, _inside_square), (ELLIPSE, _inside_ellipse), (HEART, _inside_heart)):
        m = sh == k
        if m.any():
            inside[m] = test(u[m], v[m], S[m])
    idx = np.arange(sh.size)[:, None, None]
    out[idx, rows[:, :, None], cols[:, None, :]] = inside


def render_classes(
    shape: np.ndarray | int,
    scale: np.ndarray,
    orientation: np.ndarray,
    pos_x: np.ndarray,
    pos_y: np.ndarray,
) -> np.ndarray:
    """Render images from latent *class indices* (shape, scale, orientation, posX, posY)."""
    check_classes(shape, scale, orientation, pos_x, pos_y)
    return render(
        shape,
        scale_values()[np.asarray(scale)],
        orientation_values()[np.asarray(orientation)],
        position_values()[np.asarray(pos_x)],
        position_values()[np.asarray(pos_y)],
    )


def check_classes(*classes: np.ndarray | int) -> None:
    """Raise ValueError unless (shape, scale, orientation, posX, posY) indices are in range."""
    for name, size, c in zip(LATENT_NAMES[1:], LATENT_SIZES[1:], classes, strict=True):
        a = np.asarray(c)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} class indices must be integers, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= size):
            raise ValueError(f"{name} class indices must lie in 0..{size - 1}")


def pixel_mismatch(images: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of mismatched pixels relative to the reference's "on" pixels.

    mismatch = #{pixels where images ≠ reference} / #{reference pixels that are on}.
    """
    images = np.asarray(images).astype(bool)
    reference = np.asarray(reference).astype(bool)
    if images.shape != reference.shape:
        raise ValueError(f"shapes differ: {images.shape} vs {reference.shape}")
    on = int(reference.sum())
    if on == 0:
        raise ValueError("the reference images have no 'on' pixels")
    return int((images != reference).sum()) / on


# ------------------------------------------------------------------------------ the archive
class ArchiveError(ValueError):
    """The dSprites archive is missing or malformed."""


def latent_bases(sizes: Sequence[int] = LATENT_SIZES) -> np.ndarray:
    """Row-major strides of the latent grid: row = Σ_k class_k · bases_k."""
    s = np.asarray(sizes, dtype=np.int64)
    return np.concatenate([np.cumprod(s[::-1])[::-1][1:], [1]]).astype(np.int64)


class DSpritesArchive:
    """The real dSprites archive ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``.

    Loading is pickle-free: the archive's only pickled member is ``metadata`` (a Python-2 dict,
    which is why the dataset's own instructions say ``allow_pickle=True, encoding="bytes"``), and
    it is never read: the latent layout is the documented one, checked against
    ``latents_classes``. ``imgs`` and ``latents_classes`` are plain arrays, read with
    ``allow_pickle=False``. Decompressing the images takes about 3 GB of memory
    (737,280 × 64 × 64 bytes); archives are cached per path within a process.

    Args:
        path: the ``.npz`` file.
        latent_sizes: the latent grid of the archive (the real one by default; smaller grids built
            the same way, e.g. for tests, work too).

    Raises:
        ArchiveError: the file is missing, is not an ``.npz`` archive, lacks ``imgs`` or
            ``latents_classes``, or has arrays of the wrong shape.
    """

    def __init__(self, path: str | os.PathLike[str], latent_sizes: Sequence[int] = LATENT_SIZES):
        self.path = Path(path).expanduser()
        self.latent_sizes = tuple(int(s) for s in latent_sizes)
        self.bases = latent_bases(self.latent_sizes)
        self.imgs, self.latents_classes = _load_archive(str(self.path.resolve()), self.latent_sizes)

    def images(
        self,
        shape: np.ndarray | int,
        scale: np.ndarray,
        orientation: np.ndarray,
        pos_x: np.ndarray,
        pos_y: np.ndarray,
    ) -> np.ndarray:
        """Images ``[n, 64, 64]`` (uint8) for latent class indices (color is 0)."""
        latents = (shape, scale, orientation, pos_x, pos_y)
        arrays = np.broadcast_arrays(*(np.asarray(a) for a in latents))
        classes = np.stack([np.zeros_like(arrays[0]), *arrays], axis=-1).reshape(-1, 6)
        sizes = np.asarray(self.latent_sizes)
        if classes.size and ((classes < 0).any() or (classes >= sizes).any()):
            raise ValueError(f"latent class indices out of range for sizes {self.latent_sizes}")
        rows = classes.astype(np.int64) @ self.bases
        found = self.latents_classes[rows]
        if not np.array_equal(found, classes):
            raise ArchiveError(
                f"{self.path}: latents_classes do not follow the row-major layout of "
                f"{self.latent_sizes}; is this the original dSprites archive?"
            )
        return np.ascontiguousarray(self.imgs[rows]).astype(np.uint8, copy=False)


@functools.lru_cache(maxsize=2)
def _load_archive(path: str, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise ArchiveError(
            f"dSprites archive not found at {p}; download {ARCHIVE_NAME} from "
            "https://github.com/deepmind/dsprites-dataset and pass its path, or use the built-in "
            "renderer (source='render')"
        )
    if not zipfile.is_zipfile(p):
        raise ArchiveError(f"{p} is not a readable .npz archive (not a zip file)")
    try:
        # Only the pickled `metadata` member would need allow_pickle=True; it is never read.
        npz = np.load(p, allow_pickle=False)
    except Exception as e:
        raise ArchiveError(f"{p} is not a readable .npz archive: {e}") from e
    with npz:
        missing = [k for k in ("imgs", "latents_classes") if k not in npz.files]
        if missing:
            raise ArchiveError(
                f"{p} lacks the key(s) {missing} (found {sorted(npz.files)}); expected the "
                "dSprites archive with imgs, latents_values, latents_classes"
            )
        try:
            imgs = npz["imgs"]
            classes = npz["latents_classes"]
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise ArchiveError(f"{p}: cannot read imgs/latents_classes: {e}") from e
    n = int(np.prod(sizes))
    if imgs.ndim != 3 or imgs.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ArchiveError(f"{p}: imgs must have shape (N, 64, 64), got {imgs.shape}")
    if imgs.shape[0] != n:
        raise ArchiveError(
            f"{p}: imgs holds {imgs.shape[0]} images, expected {n} for the latent grid {sizes}"
        )
    if classes.shape != (n, 6):
        raise ArchiveError(f"{p}: latents_classes must have shape ({n}, 6), got {classes.shape}")
    return imgs, classes.astype(np.int64)


# --------------------------------------------------------------------------- image sources
class ImageSource(Protocol):
    """Where dSprites images come from, indexed by latent class indices."""

    def images(
        self,
        shape: np.ndarray | int,
        scale: np.ndarray,
        orientation: np.ndarray,
        pos_x: np.ndarray,
        pos_y: np.ndarray,
    ) -> np.ndarray:
        """uint8 images ``[n, 64, 64]`` in {0, 1}."""
        ...

    def key(self) -> str:
        """A string identifying the images this source produces (for dataset caches)."""
        ...


class RenderSource:
    """Images from the procedural renderer (the default; no file needed)."""

    #: bump when the renderer's output changes, so cached datasets are regenerated
    VERSION = 1

    def images(
        self,
        shape: np.ndarray | int,
        scale: np.ndarray,
        orientation: np.ndarray,
        pos_x: np.ndarray,
        pos_y: np.ndarray,
    ) -> np.ndarray:
        return render_classes(shape, scale, orientation, pos_x, pos_y)

    def key(self) -> str:
        return f"render-v{self.VERSION}"


class ArchiveSource:
    """Images from the real dSprites archive at ``path`` (loaded lazily, on first use)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ArchiveError(f"dSprites archive not found at {self.path}")
        self._archive: DSpritesArchive | None = None

    def images(
        self,
        shape: np.ndarray | int,
        scale: np.ndarray,
        orientation: np.ndarray,
        pos_x: np.ndarray,
        pos_y: np.ndarray,
    ) -> np.ndarray:
        if self._archive is None:
            self._archive = DSpritesArchive(self.path)
        return self._archive.images(shape, scale, orientation, pos_x, pos_y)

    def key(self) -> str:
        return f"archive-sha256:{file_sha256(self.path)}"


def make_source(kind: str = "render", path: str | os.PathLike[str] | None = None) -> ImageSource:
    """``"render"`` (procedural) or ``"archive"`` (the real archive at ``path``)."""
    if kind == "render":
        return RenderSource()
    if kind == "archive":
        if path is None:
            raise ArchiveError("source='archive' needs archive_path= (the dSprites .npz file)")
        return ArchiveSource(path)
    raise ValueError(f"unknown dSprites image source {kind!r}; use 'render' or 'archive'")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (memoised per path, size and modification time)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime)


__all__ = [
    "ARCHIVE_NAME",
    "ELLIPSE",
    "HEART",
    "LATENT_NAMES",
    "LATENT_SIZES",
    "SQUARE",
    "ArchiveError",
    "ArchiveSource",
    "DSpritesArchive",
    "ImageSource",
    "RenderSource",
    "file_sha256",
    "latent_bases",
    "make_source",
    "orientation_values",
    "pixel_mismatch",
    "position_values",
    "render",
    "render_classes",
    "scale_values",
]
