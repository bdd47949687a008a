"""funcbo.rng: capture and restore the global generators, through a weights-only checkpoint."""

import io
import random

import numpy as np
import torch

from funcbo.rng import rng_state, set_rng_state


def _draw() -> tuple[torch.Tensor, np.ndarray, float, float, float]:
    # np.random.normal twice: the second draw uses numpy's cached Gaussian (has_gauss).
    return (
        torch.rand(5),
        np.random.rand(3),
        random.random(),
        random.gauss(0.0, 1.0),
        float(np.random.normal()) + float(np.random.normal()),
    )


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same(a, b) -> bool:
    return (
        torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]  # exact floats
    )


def test_restored_state_draws_the_same_numbers_after_a_weights_only_load():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.normal()  # leave a cached Gaussian in numpy's state
    random.gauss(0.0, 1.0)  # and in Python's
    state = _roundtrip(rng_state())
    first = _draw()
    _draw()
    set_rng_state(state)
    assert _same(_draw(), first)


def test_state_holds_only_tensors_lists_and_scalars():
    state = rng_state()
    assert set(state) >= {"torch", "numpy", "python"}
    assert isinstance(state["torch"], torch.Tensor)
    assert state["numpy"][0] == "MT19937" and state["numpy"][1].dtype == torch.int64
    assert isinstance(state["python"], list) and isinstance(state["python"][1], list)


def _old_runner_state() -> dict:
    """The state as funcbo.experiments.runner wrote it before funcbo.rng existed (and as the
    Trainer wrote it, without the CUDA entry)."""
    np_state = np.random.get_state()

    def lists(x):
        return [lists(v) for v in x] if isinstance(x, tuple) else x

    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": lists(random.getstate()),
    }


def test_states_written_by_earlier_versions_restore():
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    old = _roundtrip(_old_runner_state())
    first = _draw()
    set_rng_state(old)
    assert _same(_draw(), first)
    # and the format is the one written today
    new = rng_state()
    old_now = _old_runner_state()
    assert set(new) - {"cuda"} == set(old_now)
    assert torch.equal(new["torch"], old_now["torch"])
    assert torch.equal(new["numpy"][1], old_now["numpy"][1])
    assert new["python"] == old_now["python"]
