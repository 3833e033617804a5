"""Atomic writes (models/files.py): complete or absent, no temporary file left, the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest
from PIL import Image

from models import files
from models.files import atomic_path


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def temporaries(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_new_file_gets_the_mode_open_would_give(tmp_path, monkeypatch):
    for umask, want in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        monkeypatch.setattr(files, "_UMASK", umask)
        target = tmp_path / f"new-{umask:o}.json"
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("{}")
        assert target.read_text() == "{}" and mode(target) == want  # not mkstemp's 0600
    assert temporaries(tmp_path) == []


def test_replacing_keeps_the_file_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_UMASK", 0o022)
    target = tmp_path / "private.json"
    target.write_text("old")
    os.chmod(target, 0o600)  # the user made it private: a rewrite must not open it up
    with atomic_path(target, durable=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and mode(target) == 0o600


def test_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "b.json") as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and not (tmp_path / "b.json").exists()
    assert temporaries(tmp_path) == []


def test_images_are_readable_by_others_like_any_saved_file(tmp_path, monkeypatch):
    from app.outputs import save_image_atomic

    monkeypatch.setattr(files, "_UMASK", 0o022)
    path = save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "out" / "fox.png", {"prompt": "fox"})
    assert mode(path) == 0o644 and temporaries(path.parent) == []


def test_umask_is_read_without_changing_it():
    before = os.umask(0o027)
    try:
        assert files._umask() == 0o027 and files._umask() == 0o027
    finally:
        os.umask(before)


def test_tiny_model_folder_is_not_private(tmp_path, monkeypatch):
    from models.z_image.tiny import write_tiny_model

    monkeypatch.setattr(files, "_UMASK", 0o022)
    folder = write_tiny_model(tmp_path / "tiny")
    assert mode(folder) == 0o755  # not mkdtemp's 0700
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
