"""The DFIV dSprites instrumental-variable benchmark (Xu et al., ICLR 2021), exactly as specified.

Data-generating process for ``n`` training points and a seed (hearts only, shape class 2). All
draws come from one ``rng = np.random.default_rng(seed)``, in this order:

1. posX index  = rng.integers(32, size=n)
2. posY index  = rng.integers(32, size=n)
3. scale index = rng.integers(6, size=n)
4. orientation index = rng.integers(40, size=n)
5. pixel noise = rng.normal(0.0, 0.1, size=(n, 4096))      (row-major: image by image)
6. outcome noise = rng.normal(0.0, 0.5, size=n)

Treatment X = image (flattened, in {0, 1}) + pixel noise. Instrument Z = the latent *values*
(scale, orientation in radians, posX) ∈ R³. Confounder: the posY index. With the structural
matrix A ∈ R^{4096×10},

    f(X) = (mean_k (X A)²_k − 5000) / 1000,       Y = f(X) + (posY_index − 16) + outcome noise,

f evaluated on the noisy X. The n points are split 50/50 into a stage-1 (inner) and a stage-2
(outer) half with the index split of ``sklearn.model_selection.train_test_split(train_size=0.5,
random_state=seed)`` used by the FuncID code: p = np.random.RandomState(seed).permutation(n);
stage 2 = p[:⌈n/2⌉], stage 1 = p[⌈n/2⌉:]. The test set is the 588 clean images (no noise) on the
grid posX, posY ∈ {0, 5, …, 30} × scale ∈ {0, 3, 5} × orientation ∈ {0, 10, 20, 30} (indices,
nested in that order, posX outermost), scored against f. A is drawn U(0, 1) from its own seed
(``np.random.default_rng(matrix_seed).uniform(0, 1, (4096, 10))``) unless a ``.npy`` file is given
(DFIV's ``dsprite_mat.npy`` for comparability).

Treatments are returned (and cached) in float32; f and Y are computed in float64 first.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from funcbo.apps.iv.cache import cached_arrays
from funcbo.apps.iv.dsprites import (
    HEART,
    ImageSource,
    file_sha256,
    make_source,
    orientation_values,
    position_values,
    scale_values,
)

N_PIXELS = 64 * 64
MATRIX_SHAPE = (N_PIXELS, 10)
#: test grid (latent class indices)
TEST_POS = tuple(range(0, 32, 5))
TEST_SCALE = (0, 3, 5)
TEST_ORIENTATION = (0, 10, 20, 30)
#: bump when the generation code changes, so cached datasets are regenerated
DATA_VERSION = 1


# --------------------------------------------------------------------------- containers
@dataclass
class IVSplit:
    """One half of the training data: instrument Z, treatment X, outcome Y, f(X, C) and, when
    the design has them, observed covariates C (exogenous: also part of the instrument)."""

    instrument: np.ndarray  # [n, d_z]
    treatment: np.ndarray  # [n, d_x]
    outcome: np.ndarray  # [n, 1]
    structural: np.ndarray  # [n, 1]
    covariate: np.ndarray | None = None  # [n, d_c]

    def __len__(self) -> int:
        return int(self.outcome.shape[0])


@dataclass
class IVTestSet:
    """Test treatments (and covariates, when the design has them) and the structural function's
    values there."""

    treatment: np.ndarray  # [m, d_x]
    structural: np.ndarray  # [m, 1]
    covariate: np.ndarray | None = None  # [m, d_c]

    def __len__(self) -> int:
        return int(self.structural.shape[0])


@dataclass
class IVData:
    """A generated IV dataset: stage-1 (inner) half, stage-2 (outer) half, test set."""

    stage1: IVSplit
    stage2: IVSplit
    test: IVTestSet
    params: dict[str, Any] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat name → array mapping (for the cache; absent covariates are left out)."""
        out: dict[str, np.ndarray] = {}
        for name, part in (("stage1", self.stage1), ("stage2", self.stage2), ("test", self.test)):
            for k, v in vars(part).items():
                if v is not None:
                    out[f"{name}_{k}"] = v
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any]) -> IVData:
        """Inverse of :meth:`to_arrays`."""

        def split(name: str) -> IVSplit:
            return IVSplit(
                instrument=arrays[f"{name}_instrument"],
                treatment=arrays[f"{name}_treatment"],
                outcome=arrays[f"{name}_outcome"],
                structural=arrays[f"{name}_structural"],
                covariate=arrays.get(f"{name}_covariate"),
            )

        test = IVTestSet(
            arrays["test_treatment"], arrays["test_structural"], arrays.get("test_covariate")
        )
        return cls(split("stage1"), split("stage2"), test, dict(params))


@dataclass
class IVTensors:
    """An :class:`IVData` as torch tensors, in the batch format of
    :class:`~funcbo.apps.iv.problem.IVProblem`: ``stage1 = {"z", "t"}``, ``stage2 = {"z", "y"}``,
    ``test = {"t", "f"}`` (outcomes and f as ``[n, 1]``), each with ``"x"`` (the covariates)
    added when the design has covariates."""

    stage1: dict[str, Tensor]
    stage2: dict[str, Tensor]
    test: dict[str, Tensor]

    @classmethod
    def from_data(
        cls, data: IVData, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> IVTensors:
        def t(a: np.ndarray) -> Tensor:
            return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

        def with_covariate(part: dict[str, Tensor], c: np.ndarray | None) -> dict[str, Tensor]:
            return part if c is None else {**part, "x": t(c)}

        s1, s2, test = data.stage1, data.stage2, data.test
        return cls(
            with_covariate({"z": t(s1.instrument), "t": t(s1.treatment)}, s1.covariate),
            with_covariate({"z": t(s2.instrument), "y": t(s2.outcome)}, s2.covariate),
            with_covariate({"t": t(test.treatment), "f": t(test.structural)}, test.covariate),
        )


def split_indices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(stage-1, stage-2) indices: sklearn's ``train_test_split(train_size=0.5,
    random_state=seed)`` split, p = RandomState(seed).permutation(n), stage 2 = p[:⌈n/2⌉]."""
    perm = np.random.RandomState(seed).permutation(n)
    n_test = n - n // 2
    return perm[n_test:], perm[:n_test]


def split_train(arrays: dict[str, np.ndarray], seed: int) -> tuple[IVSplit, IVSplit]:
    """Split full training arrays (instrument, treatment, outcome, structural and, if present,
    covariate) 50/50."""
    n = arrays["outcome"].shape[0]
    i1, i2 = split_indices(n, seed)
    cov = arrays.get("covariate")

    def part(idx: np.ndarray) -> IVSplit:
        return IVSplit(
            instrument=arrays["instrument"][idx],
            treatment=arrays["treatment"][idx],
            outcome=arrays["outcome"][idx],
            structural=arrays["structural"][idx],
            covariate=None if cov is None else cov[idx],
        )

    return part(i1), part(i2)


# ---------------------------------------------------------------------- structural function
def structural_matrix(seed: int = 0) -> np.ndarray:
    """A ~ U(0, 1)^{4096×10} drawn from ``np.random.default_rng(seed)`` (float64)."""
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=MATRIX_SHAPE)


def load_structural_matrix(path: str | os.PathLike[str]) -> np.ndarray:
    """Load A from a ``.npy`` file (no pickle) and check it is a finite 4096×10 float matrix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a ``.npy`` array, wrong shape or dtype, or non-finite entries.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"structural matrix file not found: {p} (resolved from {os.getcwd()}). The paper "
            "configs use DFIV's fixed matrix, data/dsprite_mat.npy of "
            "github.com/liyuan9988/DeepFeatureIV (MIT), 4096×10: put a copy there or set "
            "problem.matrix_path to it (--set problem.matrix_path=PATH); "
            "problem.matrix_path=null draws a seeded U(0, 1) matrix instead"
        )
    try:
        A = np.load(p, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{p} is not a readable .npy array (pickle disabled): {e}") from e
    if not isinstance(A, np.ndarray):
        raise ValueError(f"{p} holds an archive, not a single .npy array")
    if A.shape != MATRIX_SHAPE:
        raise ValueError(f"structural matrix {p} has shape {A.shape}, expected {MATRIX_SHAPE}")
    if not np.issubdtype(A.dtype, np.floating):
        raise ValueError(f"structural matrix {p} has dtype {A.dtype}, expected a float dtype")
    if not np.isfinite(A).all():
        raise ValueError(f"structural matrix {p} has non-finite entries")
    return A.astype(np.float64)


def structural_function(treatment: np.ndarray, A: np.ndarray) -> np.ndarray:
    """f(X) = (mean over the 10 columns of (X A)² − 5000) / 1000, shape ``[n]`` (float64)."""
    XA = np.asarray(treatment, dtype=np.float64) @ A
    return (np.mean(XA**2, axis=1) - 5000.0) / 1000.0


# ------------------------------------------------------------------------------- generation
def generate_dsprites_train(
    n: int, seed: int, source: ImageSource, A: np.ndarray
) -> dict[str, np.ndarray]:
    """The n training points of the DGP (module docstring), before the split.

    Returns:
        ``instrument`` [n, 3], ``treatment`` [n, 4096] (float32), ``outcome`` [n, 1],
        ``structural`` [n, 1] and ``latents`` [n, 4] (posX, posY, scale, orientation indices).
    """
    if n < 2:
        raise ValueError(f"the dSprites IV data needs n ≥ 2, got {n}")
    rng = np.random.default_rng(seed)
    pos_x = rng.integers(32, size=n)
    pos_y = rng.integers(32, size=n)
    scale = rng.integers(6, size=n)
    orientation = rng.integers(40, size=n)
    images = source.images(HEART, scale, orientation, pos_x, pos_y).reshape(n, N_PIXELS)
    treatment = images.astype(np.float64)
    treatment += rng.normal(0.0, 0.1, size=treatment.shape)
    instrument = np.stack(
        [scale_values()[scale], orientation_values()[orientation], position_values()[pos_x]],
        axis=1,
    )
    outcome_noise = (pos_y - 16.0) + rng.normal(0.0, 0.5, size=n)
    structural = structural_function(treatment, A)
    outcome = structural + outcome_noise
    return {
        "instrument": instrument,
        "treatment": treatment.astype(np.float32),
        "outcome": outcome[:, None],
        "structural": structural[:, None],
        "latents": np.stack([pos_x, pos_y, scale, orientation], axis=1),
    }


def grid_latents() -> np.ndarray:
    """The 588 test latents ``[588, 4]`` (posX, posY, scale, orientation indices)."""
    grid = itertools.product(TEST_POS, TEST_POS, TEST_SCALE, TEST_ORIENTATION)
    return np.array(list(grid), dtype=np.int64)


def generate_dsprites_test(source: ImageSource, A: np.ndarray) -> IVTestSet:
    """The 588 clean test images and f on them."""
    lat = grid_latents()
    images = source.images(HEART, lat[:, 2], lat[:, 3], lat[:, 0], lat[:, 1])
    treatment = images.reshape(len(lat), N_PIXELS).astype(np.float64)
    structural = structural_function(treatment, A)
    return IVTestSet(treatment.astype(np.float32), structural[:, None])


def dsprites_data(
    n: int = 5000,
    seed: int = 0,
    *,
    source: str = "render",
    archive_path: str | os.PathLike[str] | None = None,
    matrix: str | os.PathLike[str] | None = None,
    matrix_seed: int = 0,
    use_cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> IVData:
    """The dSprites IV dataset: stage-1 and stage-2 halves of n points, and the 588-point test.

    Args:
        n: training points (5000 or 10000 in the benchmark), split 50/50.
        seed: the data seed (draws and split).
        source: ``"render"`` (procedural, default) or ``"archive"`` (the real dSprites archive).
        archive_path: the archive's path when ``source="archive"``.
        matrix: path of a ``.npy`` structural matrix (e.g. DFIV's ``dsprite_mat.npy``); when None,
            A is drawn from ``matrix_seed``.
        matrix_seed: seed of the drawn A (fixed across runs: f is part of the benchmark).
        use_cache, cache_dir: the on-disk cache (see :mod:`funcbo.apps.iv.cache`).

    Returns:
        :class:`IVData` (instrument [·, 3], treatment [·, 4096] float32, outcome and f [·, 1]).
    """
    img_source = make_source(source, archive_path)
    if matrix is not None:
        A = load_structural_matrix(matrix)
        matrix_key = f"npy-sha256:{file_sha256(matrix)}"
    else:
        A = structural_matrix(matrix_seed)
        matrix_key = f"uniform-seed:{matrix_seed}"
    params = {
        "dataset": "dsprites",
        "version": DATA_VERSION,
        "n": int(n),
        "seed": int(seed),
        "source": img_source.key(),
        "matrix": matrix_key,
    }

    def build() -> dict[str, np.ndarray]:
        full = generate_dsprites_train(n, seed, img_source, A)
        s1, s2 = split_train(full, seed)
        data = IVData(s1, s2, generate_dsprites_test(img_source, A))
        return data.to_arrays()

    arrays = cached_arrays("dsprites", params, build, use_cache=use_cache, directory=cache_dir)
    return IVData.from_arrays(arrays, params)


__all__ = [
    "IVData",
    "IVSplit",
    "IVTensors",
    "IVTestSet",
    "dsprites_data",
    "generate_dsprites_test",
    "generate_dsprites_train",
    "grid_latents",
    "load_structural_matrix",
    "split_indices",
    "split_train",
    "structural_function",
    "structural_matrix",
]
