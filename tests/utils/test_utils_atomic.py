"""Atomic writes: a write that fails midway leaves the previous file whole and no temp file behind."""
import json
import pickle

import pytest
import torch

from ldm.utils.atomic import (
    AtomicFile,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
)


class Interrupted(Exception):
    pass


def half_then_fail(f) -> None:
    f.write(b"half of the new ")
    raise Interrupted


def test_each_writer_replaces_the_file_and_leaves_only_it(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "tėxt")
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [2]})
    atomic_write_yaml(tmp_path / "d.yaml", {"lr": 0.1, "name": "x"})
    atomic_torch_save({"step": 3, "w": torch.arange(4)}, tmp_path / "sub" / "e.ckpt")  # parents are created
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text() == "tėxt"
    assert json.loads((tmp_path / "c.json").read_text()) == {"b": 1, "a": [2]}
    assert (tmp_path / "d.yaml").read_text() == "lr: 0.1\nname: x\n"
    assert torch.equal(torch.load(tmp_path / "sub" / "e.ckpt", weights_only=True)["w"], torch.arange(4))
    atomic_write_text(tmp_path / "b.txt", "new")
    assert (tmp_path / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.txt", "c.json", "d.yaml", "e.ckpt", "sub"]


def test_a_write_failing_midway_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path, ckpt = tmp_path / "metrics.json", tmp_path / "last.ckpt"
    atomic_write_json(path, {"fid": 1.5})
    atomic_torch_save({"x": torch.ones(2)}, ckpt)
    with pytest.raises(Interrupted):  # some bytes written, then an error
        atomic_write(path, half_then_fail)
    with pytest.raises(TypeError):  # not JSON: fails while serialising
        atomic_write_json(path, {"fid": object()})
    with pytest.raises((AttributeError, pickle.PicklingError)):  # torch.save fails while pickling
        atomic_torch_save({"x": torch.zeros(2), "f": lambda: 0}, ckpt)
    assert json.loads(path.read_text()) == {"fid": 1.5}
    assert torch.equal(torch.load(ckpt, weights_only=True)["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "metrics.json"]


def test_exclusive_commit_never_overwrites(tmp_path):
    path = tmp_path / "plan.json"
    assert atomic_write_json(path, {"owner": 1}, exclusive=True)
    assert not atomic_write_json(path, {"owner": 2}, exclusive=True)
    assert json.loads(path.read_text()) == {"owner": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_streamed_file_appears_only_on_commit(tmp_path):
    path = tmp_path / "shard.tar"
    out = AtomicFile(path, tmp_name=".shard.tar.tmp-mine")
    out.file.write(b"part")
    assert not path.exists() and out.tmp == tmp_path / ".shard.tar.tmp-mine"
    out.sync()
    assert out.tmp.read_bytes() == b"part"  # final content, readable before the rename
    out.commit()
    assert path.read_bytes() == b"part" and not out.tmp.exists()
    dropped = AtomicFile(path)
    dropped.file.write(b"other")
    dropped.abort()
    assert path.read_bytes() == b"part" and [p.name for p in tmp_path.iterdir()] == ["shard.tar"]
