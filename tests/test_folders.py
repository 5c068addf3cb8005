import os
import subprocess
import sys

import pytest

from diffiner.audio.folders import is_inside, list_audio_files, pair_files


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def test_pairs_by_relative_path_never_by_sort_order(tmp_path, caplog):
    for rel in ["a.wav", "x/b.flac", "x/y/c.wav", "only_noisy.wav"]:
        touch(str(tmp_path / "noisy" / rel))
    for rel in ["a.wav", "x/b.flac", "x/y/c.wav", "0_only_proc.wav", "notes.txt"]:
        touch(str(tmp_path / "proc" / rel))
    common, missing = pair_files({"noisy": str(tmp_path / "noisy"), "processed": str(tmp_path / "proc")})
    assert common == ["a.wav", "x/b.flac", "x/y/c.wav"]
    assert missing == {"noisy": ["0_only_proc.wav"], "processed": ["only_noisy.wav"]}
    assert "only_noisy.wav" in caplog.text and "0_only_proc.wav" in caplog.text


def test_excluded_folders_and_temporary_files_are_not_listed(tmp_path):
    touch(str(tmp_path / "a.wav"))
    touch(str(tmp_path / "out" / "a.wav"))
    touch(str(tmp_path / ".tmp-123-b.wav"))
    assert list_audio_files(str(tmp_path), exclude=[str(tmp_path / "out")]) == ["a.wav"]
    assert is_inside(str(tmp_path / "out" / "x"), str(tmp_path)) and not is_inside(str(tmp_path), str(tmp_path / "out"))


def test_no_common_file_is_an_error(tmp_path):
    touch(str(tmp_path / "n" / "a.wav"))
    touch(str(tmp_path / "p" / "b.wav"))
    with pytest.raises(FileNotFoundError, match="no audio file"):
        pair_files({"noisy": str(tmp_path / "n"), "processed": str(tmp_path / "p")}, warn=False)


def test_inference_imports_neither_mpi4py_nor_blobfile():
    code = ("import sys, diffiner.commands.refine, diffiner.pipeline; "
            "print(any(m in sys.modules for m in ('mpi4py', 'blobfile')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
