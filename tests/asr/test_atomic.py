"""Atomic file and directory writes: complete or absent, never half-written; stale temporaries cleaned."""

from __future__ import annotations

import pytest

from ebranchformer.asr.atomic import atomic_directory, atomic_write, is_temp_name, remove_stale_temps


def test_atomic_write_replaces_or_keeps(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    assert path.read_text() == "two"

    def fails(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_names_a_missing_directory(tmp_path):
    target = tmp_path / "no" / "f.txt"
    with pytest.raises(FileNotFoundError, match=r"cannot write '.*f\.txt': its directory '.*no' does not exist"):
        atomic_write(target, "x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and is_temp_name(tmp.name) and not target.exists()
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["d"]
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and [p.name for p in tmp_path.iterdir()] == ["d"]
    with pytest.raises(FileExistsError), atomic_directory(target, overwrite=False):
        pass


def test_remove_stale_temps(tmp_path):
    (tmp_path / ".a.tmp-1-ff").mkdir()
    (tmp_path / ".a.old-1-ff").mkdir()
    (tmp_path / ".b.tmp-2-ee").write_text("x")
    (tmp_path / ".hidden").write_text("keep")
    (tmp_path / "a").mkdir()
    assert sorted(p.name for p in remove_stale_temps(tmp_path, "a")) == [".a.old-1-ff", ".a.tmp-1-ff"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.tmp-2-ee", ".hidden", "a"]
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "a"]
    assert remove_stale_temps(tmp_path / "missing") == []
