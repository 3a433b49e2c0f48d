"""model.paths: an output file or folder is checked before any work, in one line, and nothing is created."""

from __future__ import annotations

import os

import pytest

from model.errors import UserError
from model.paths import OutputPathError, check_output_dir, check_output_file


def test_writable_outputs_pass_and_nothing_is_created(tmp_path):
    (tmp_path / "old.onnx").write_bytes(b"x")
    (tmp_path / "run").mkdir()
    assert check_output_file(tmp_path / "new.onnx") == tmp_path / "new.onnx"
    assert check_output_file(tmp_path / "old.onnx", "-o") == tmp_path / "old.onnx"  # replaced later
    assert check_output_file(tmp_path / "a" / "b" / "m.onnx") == tmp_path / "a" / "b" / "m.onnx"
    assert check_output_dir(tmp_path / "run") == tmp_path / "run"
    assert check_output_dir(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx", "run"]


def test_a_folder_where_a_file_goes(tmp_path):
    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(OutputPathError, match=r"^-o .*m\.onnx: is a folder; give a file name") as info:
        check_output_file(tmp_path / "m.onnx", "-o")
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_a_file_where_a_folder_goes(tmp_path):
    (tmp_path / "results").write_text("x")
    with pytest.raises(OutputPathError, match=r"^--output .*results: is a file, not a folder"):
        check_output_dir(tmp_path / "results")


@pytest.mark.parametrize("check", [check_output_file, check_output_dir])
def test_a_file_in_the_way_of_a_parent_folder(tmp_path, check):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match=r"afile is a file, not a folder$"):
        check(tmp_path / "afile" / "sub" / "out")


@pytest.mark.parametrize("check", [check_output_file, check_output_dir])
def test_a_folder_this_user_cannot_write_in(tmp_path, check, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # root may write anywhere, so the permission answer is stood in for
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and str(path) != str(locked))
    with pytest.raises(OutputPathError, match=r"locked/new: cannot write in .*locked \(permission denied\)$"):
        check(locked / "new")
    with pytest.raises(OutputPathError, match="permission denied"):
        check_output_dir(locked)
    assert check(tmp_path / "free") == tmp_path / "free"
