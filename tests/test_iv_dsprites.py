"""The dSprites renderer (fidelity to real frames) and the real-archive loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from funcbo.apps.iv.dsprites import (
    HEART,
    SQUARE,
    ArchiveError,
    ArchiveSource,
    DSpritesArchive,
    RenderSource,
    latent_bases,
    make_source,
    pixel_mismatch,
    render,
    render_classes,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FRAMES = SHARED / "dsprites_reference_frames.npz"


@pytest.fixture(scope="module")
def frames() -> dict[str, np.ndarray]:
    if not FRAMES.is_file():
        pytest.skip(f"reference frames not found at {FRAMES} (../shared/data next to the repo)")
    with np.load(FRAMES, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_renderer_matches_the_reference_frames(frames: dict[str, np.ndarray]) -> None:
    ref = frames["images"]
    assert ref.shape == (202, 64, 64)
    out = render(
        frames["shape"], frames["scale"], frames["orientation"], frames["posX"], frames["posY"]
    )
    assert out.shape == ref.shape and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1}
    mismatch = pixel_mismatch(out, ref)
    assert mismatch <= 0.005, f"{mismatch:.4%} of the reference 'on' pixels mismatched"
    for k in range(3):  # every shape is faithful, not just on average
        m = frames["shape"] == k
        assert pixel_mismatch(out[m], ref[m]) <= 0.01


def test_renderer_geometry() -> None:
    # an axis-aligned square of side 19.2 px centred at (32, 32): centres 22.5..41.5 are on
    img = render(SQUARE, 1.0, 0.0, 0.5, 0.5)[0]
    rows, cols = np.nonzero(img)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (22, 41, 22, 41)
    # a heart has its lobes up and its tip down at θ = 0; rotating by π flips it
    heart = render(HEART, 1.0, 0.0, 0.5, 0.5)[0].astype(int)
    top, bottom = heart[:32].sum(1), heart[32:].sum(1)
    assert top.max() > bottom[bottom > 0].min()  # wide lobes above, a narrow tip below
    flipped = render(HEART, 1.0, np.pi, 0.5, 0.5)[0].astype(int)
    assert abs(int(flipped.sum()) - int(heart.sum())) <= 8
    assert np.argmax(flipped.sum(1)) > np.argmax(heart.sum(1))
    # position: posX moves right, posY moves down
    a = render(SQUARE, 0.5, 0.0, 0.0, 0.0)[0]
    b = render(SQUARE, 0.5, 0.0, 1.0, 1.0)[0]
    assert np.nonzero(a)[1].mean() < np.nonzero(b)[1].mean()
    assert np.nonzero(a)[0].mean() < np.nonzero(b)[0].mean()


def test_render_classes_is_vectorised_and_validates() -> None:
    rng = np.random.default_rng(0)
    n = 300
    idx = [rng.integers(s, size=n) for s in (3, 6, 40, 32, 32)]
    batch = render_classes(*idx)
    one = np.stack([render_classes(*(a[i : i + 1] for a in idx))[0] for i in range(0, n, 37)])
    assert batch.shape == (n, 64, 64)
    np.testing.assert_array_equal(batch[::37], one)
    with pytest.raises(ValueError, match="scale"):
        render_classes(2, np.array([6]), np.array([0]), np.array([0]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        render(5, 1.0, 0.0, 0.5, 0.5)


# ------------------------------------------------------------------------------ the archive
SMALL = (1, 3, 2, 3, 2, 2)  # a tiny latent grid laid out like the real archive


def write_fake_archive(path: Path, sizes: tuple[int, ...] = SMALL, **overrides: np.ndarray) -> None:
    """An archive with the real one's layout over a small grid, images from the renderer."""
    grids = np.meshgrid(*(np.arange(s) for s in sizes), indexing="ij")
    classes = np.stack([g.reshape(-1) for g in grids], axis=1)
    imgs = render_classes(*(classes[:, k] for k in range(1, 6)))
    # like the real archive, `metadata` is a pickled dict (never read by the loader)
    metadata = np.array({b"latents_sizes": np.array(sizes)}, dtype=object)
    arrays = {
        "imgs": imgs,
        "latents_classes": classes,
        "latents_values": classes.astype(float),
        "metadata": metadata,
    }
    arrays.update(overrides)
    np.savez(path, **arrays)


def test_archive_loader_reads_by_latent_classes(tmp_path: Path) -> None:
    path = tmp_path / "small.npz"
    write_fake_archive(path)
    arch = DSpritesArchive(path, latent_sizes=SMALL)
    shape, scale, orient = np.array([2, 0, 1]), np.array([1, 0, 1]), np.array([2, 1, 0])
    pos_x, pos_y = np.array([1, 0, 1]), np.array([0, 1, 1])
    got = arch.images(shape, scale, orient, pos_x, pos_y)
    np.testing.assert_array_equal(got, render_classes(shape, scale, orient, pos_x, pos_y))
    assert latent_bases().tolist() == [737280, 245760, 40960, 1024, 32, 1]


def test_archive_errors(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not found"):
        DSpritesArchive(tmp_path / "missing.npz")
    with pytest.raises(ArchiveError, match="not found"):
        make_source("archive", tmp_path / "missing.npz")
    with pytest.raises(ArchiveError, match="archive_path"):
        make_source("archive")
    with pytest.raises(ValueError, match="unknown dSprites image source"):
        make_source("paint")

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(ArchiveError, match="not a readable"):
        DSpritesArchive(garbage, latent_sizes=SMALL)

    no_keys = tmp_path / "nokeys.npz"
    np.savez(no_keys, images=np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(ArchiveError, match="lacks the key"):
        DSpritesArchive(no_keys, latent_sizes=SMALL)

    bad_imgs = tmp_path / "badimgs.npz"
    write_fake_archive(bad_imgs, imgs=np.zeros((72, 32, 32), np.uint8))
    with pytest.raises(ArchiveError, match="64, 64"):
        DSpritesArchive(bad_imgs, latent_sizes=SMALL)

    pickled = tmp_path / "pickled.npz"
    write_fake_archive(pickled, imgs=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ArchiveError, match="cannot read"):  # no unpickling, ever
        DSpritesArchive(pickled, latent_sizes=SMALL)

    small = tmp_path / "small.npz"
    write_fake_archive(small)
    with pytest.raises(ArchiveError, match="737280"):  # not the full archive
        DSpritesArchive(small)

    shuffled = tmp_path / "shuffled.npz"
    grids = np.meshgrid(*(np.arange(s) for s in SMALL), indexing="ij")
    classes = np.stack([g.reshape(-1) for g in grids], axis=1)[::-1].copy()
    write_fake_archive(shuffled, latents_classes=classes)
    arch = DSpritesArchive(shuffled, latent_sizes=SMALL)
    with pytest.raises(ArchiveError, match="row-major"):
        arch.images(np.array([1]), np.array([0]), np.array([0]), np.array([0]), np.array([0]))


def test_sources_have_cache_keys(tmp_path: Path) -> None:
    assert RenderSource().key().startswith("render-v")
    path = tmp_path / "small.npz"
    write_fake_archive(path)
    src = ArchiveSource(path)
    assert src.key().startswith("archive-sha256:")
    assert isinstance(make_source("render"), RenderSource)
