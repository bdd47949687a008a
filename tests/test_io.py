"""Atomic writes (the old file or the whole new one, no temporary left behind), JSON and JSONL
encoding, and reading a JSONL log a crash cut short."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from funcbo import io


class Boom(Exception):
    pass


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_creates_folders_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    io.atomic_write_text(path, "first\n")
    io.atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert _files(path.parent) == ["out.txt"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def write(f):
        f.write(b"half of the new con")
        f.flush()
        raise error("stopped mid-write")

    with pytest.raises(error, match="stopped mid-write"):
        io.atomic_write(path, write)
    assert path.read_text() == "old"
    assert _files(tmp_path) == ["summary.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_torch_save({"w": torch.ones(3)}, path)
    assert path.read_bytes() == b"old"
    assert _files(tmp_path) == ["checkpoint.pt"]


def test_a_value_json_cannot_encode_leaves_the_old_file(tmp_path):
    path = tmp_path / "s.json"
    io.atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        io.atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _files(tmp_path) == ["s.json"]


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o027)
    try:
        io.atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640


def test_atomic_write_json_format_and_encoding_of_tensors_numbers_and_paths(tmp_path):
    path = tmp_path / "s.json"
    obj = {
        "b": torch.tensor([1.5, 2.0], dtype=torch.float64),
        "a": np.float32(0.25),
        "c": Path("runs") / "x",
        "d": torch.tensor(3),
    }
    io.atomic_write_json(path, obj)
    text = path.read_text()
    assert text == (
        '{\n  "a": 0.25,\n  "b": [\n    1.5,\n    2.0\n  ],\n  "c": "runs/x",\n  "d": 3\n}\n'
    )


def test_atomic_torch_save_loads_with_weights_only(tmp_path):
    path = tmp_path / "ckpt.pt"
    io.atomic_torch_save({"w": torch.arange(4.0), "it": 7}, path)
    state = torch.load(path, weights_only=True)
    assert state["it"] == 7 and torch.equal(state["w"], torch.arange(4.0))


def test_append_then_read_jsonl_round_trip(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    io.append_jsonl(path, {"iteration": 0, "loss": torch.tensor(0.5)})
    io.append_jsonl(path, {"iteration": 1, "loss": np.float64(0.25)})
    assert path.read_text() == '{"iteration": 0, "loss": 0.5}\n{"iteration": 1, "loss": 0.25}\n'
    assert io.read_jsonl(path) == [{"iteration": 0, "loss": 0.5}, {"iteration": 1, "loss": 0.25}]


def test_read_jsonl_skips_a_torn_last_line_and_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"i": 0}\n\n{"i": 1}\n{"i": 2, "lo')
    assert io.read_jsonl(path) == [{"i": 0}, {"i": 1}]
    assert io.read_jsonl(tmp_path / "missing.jsonl") == []


def test_read_jsonl_names_the_file_and_line_of_a_damaged_record(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"i": 0}\n{"i": 1, "lo\n{"i": 2}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2: not valid JSON"):
        io.read_jsonl(path)
    path.write_text('{"i": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2: not a JSON object"):
        io.read_jsonl(path)
