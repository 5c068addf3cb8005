import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml

from diffiner.audio.records import record_name
from diffiner.audio.folders import (LOCK_FILE, REFINE_WRITER, RUN_RECORD, FolderError, check_write_rules,
                                    convert_folder, earlier_writer, is_inside, list_audio_files, output_lock,
                                    pair_files, pair_folders, read_run_record, scan_audio_files)
from diffiner.audio.io import OutputError

from conftest import write_wav
from fs_helpers import deadline, deny_listing, fill_disk, tree_digest


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


@pytest.mark.slow
def test_inference_imports_neither_mpi4py_nor_blobfile():
    code = ("import sys, diffiner.commands.refine, diffiner.pipeline; "
            "print(any(m in sys.modules for m in ('mpi4py', 'blobfile')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----- one walker: links, loops, odd files, unreadable folders -----

def test_a_link_to_the_parent_folder_ends_and_lists_each_file_once(tmp_path):
    touch(str(tmp_path / "a.wav"))
    touch(str(tmp_path / "sub" / "b.wav"))
    os.symlink("..", str(tmp_path / "sub" / "loop"))
    with deadline(20):
        assert list_audio_files(str(tmp_path)) == ["a.wav", os.path.join("sub", "b.wav")]


def test_a_link_to_its_own_folder_adds_no_duplicates(tmp_path):
    touch(str(tmp_path / "a.wav"))
    touch(str(tmp_path / "sub" / "b.wav"))
    os.symlink(".", str(tmp_path / "loop"))
    with deadline(20):
        assert list_audio_files(str(tmp_path)) == ["a.wav", os.path.join("sub", "b.wav")]


def test_links_to_folders_outside_are_followed_and_folders_inside_are_listed_once(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    touch(str(root / "real" / "x.wav"))
    touch(str(outside / "y.wav"))
    touch(str(outside / "z.wav"))
    os.symlink(str(root / "real"), str(root / "alias"))  # sorts before "real": still listed as real/
    os.symlink(str(outside), str(root / "ext"))
    os.symlink(str(outside / "z.wav"), str(root / "linked.wav"))
    with deadline(20):
        found = list_audio_files(str(root))
    assert found == [os.path.join("ext", "y.wav"), os.path.join("ext", "z.wav"), "linked.wav",
                     os.path.join("real", "x.wav")]


def test_fifos_and_broken_links_are_skipped_with_a_warning(tmp_path, caplog):
    touch(str(tmp_path / "a.wav"))
    os.mkfifo(str(tmp_path / "z.wav"))
    os.symlink(str(tmp_path / "gone.wav"), str(tmp_path / "broken.wav"))
    with deadline(20):
        assert list_audio_files(str(tmp_path)) == ["a.wav"]
    assert "z.wav" in caplog.text and "not a regular file" in caplog.text
    assert "broken.wav" in caplog.text


def test_an_unreadable_folder_is_reported_not_passed_over(tmp_path, monkeypatch):
    touch(str(tmp_path / "a.wav"))
    touch(str(tmp_path / "locked" / "b.wav"))
    deny_listing(monkeypatch, str(tmp_path / "locked"))
    listing = scan_audio_files(str(tmp_path))
    assert listing.files == ["a.wav"]
    assert list(listing.unreadable) == [str(tmp_path / "locked")]
    assert "Permission denied" in listing.unreadable[str(tmp_path / "locked")]


def test_unreadable_folders_are_failures_of_the_pairing_not_missing_counterparts(tmp_path, monkeypatch):
    for side in ("noisy", "proc"):
        touch(str(tmp_path / side / "a.wav"))
        touch(str(tmp_path / side / "locked" / "b.wav"))
    deny_listing(monkeypatch, str(tmp_path / "proc" / "locked"))
    pairing = pair_folders({"noisy": str(tmp_path / "noisy"), "processed": str(tmp_path / "proc")})
    assert pairing.common == ["a.wav"]
    assert pairing.missing == {"noisy": [], "processed": []}
    assert list(pairing.unreadable) == [str(tmp_path / "proc" / "locked")]


def test_an_unreadable_root_is_an_error_naming_it(tmp_path, monkeypatch):
    deny_listing(monkeypatch, str(tmp_path))
    with pytest.raises(FolderError, match=f"{tmp_path}.*Permission denied"):
        scan_audio_files(str(tmp_path))


def test_folders_holding_a_previous_refinement_are_not_inputs(tmp_path):
    touch(str(tmp_path / "a.wav"))
    refined = tmp_path / "diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6"
    touch(str(refined / "a.wav"))
    (refined / RUN_RECORD).write_text(yaml.safe_dump({"diffiner_version": "0.1.0", "refiner": {"method": "x"}}))
    # Someone else's config.yml does not hide a folder.
    touch(str(tmp_path / "theirs" / "c.wav"))
    (tmp_path / "theirs" / RUN_RECORD).write_text("learning_rate: 0.1\n")
    assert list_audio_files(str(tmp_path)) == ["a.wav", os.path.join("theirs", "c.wav")]
    # Given as the root itself, a refinement is read: refining a refinement is allowed.
    assert list_audio_files(str(refined)) == ["a.wav"]


# ----- the write rules every writer follows -----

def test_write_rules(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.makedirs(a)
    os.makedirs(b)
    check_write_rules({"IN": a}, os.path.join(a, "out"))  # a new output folder inside an input: allowed
    check_write_rules({"NOISY": a, "PROC": b}, os.path.join(b, "refined"))
    with pytest.raises(FolderError, match="is the input folder IN"):
        check_write_rules({"IN": a}, a)
    with pytest.raises(FolderError, match="contains the input folder IN"):
        check_write_rules({"IN": a}, str(tmp_path))
    with pytest.raises(FolderError, match="NOISY and PROC are the same folder"):
        check_write_rules({"NOISY": a, "PROC": os.path.join(a, ".")}, None)
    os.symlink(a, str(tmp_path / "link"))
    with pytest.raises(FolderError, match="is the input folder IN"):
        check_write_rules({"IN": a}, str(tmp_path / "link"))


def test_an_output_folder_inside_an_input_is_taken_only_when_nothing_in_it_is_input(tmp_path):
    """New, empty or holding no audio: taken. Holding audio: taken only as the output folder of an
    earlier run of the same writer (its lock file says which), or, with no writer named, of any."""
    root = tmp_path / "in"
    out = root / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "readme.txt").write_text("no audio")
    check_write_rules({"IN": str(root)}, str(out), "w")
    touch(str(out / "deep" / "x.flac"))
    for writer in ("w", None):
        with pytest.raises(FolderError, match=f"{out} lies inside the input folder IN .* holds 1 audio file.*"
                                              "x.flac written by no diffiner run"):
            check_write_rules({"IN": str(root)}, str(out), writer)
    with output_lock(str(out), "w"):
        pass
    assert earlier_writer(str(out)) == "w"
    check_write_rules({"IN": str(root)}, str(out), "w")
    check_write_rules({"IN": str(root)}, str(out))
    with pytest.raises(FolderError, match="written by w, not v"):
        check_write_rules({"IN": str(root)}, str(out), "v")
    # A refinement made before lock files existed: its config.yml says who wrote it.
    refined = root / "refined"
    touch(str(refined / "a.wav"))
    (refined / RUN_RECORD).write_text(yaml.safe_dump({"diffiner_version": "0.1.0", "refiner": {"method": "x"}}))
    check_write_rules({"IN": str(root)}, str(refined), REFINE_WRITER)
    with pytest.raises(FolderError, match="written by diffiner-refine, not diffiner-evaluate"):
        check_write_rules({"IN": str(root)}, str(refined), "diffiner-evaluate")


def test_an_output_folder_made_while_the_input_is_listed_is_not_entered(tmp_path, monkeypatch):
    """The output folder is excluded by its path too: one that a writer creates (and fills) while
    the walker lists the input is never read as input."""
    touch(str(tmp_path / "a.wav"))
    real = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) == str(tmp_path):
            touch(str(tmp_path / "out" / "a.wav"))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert scan_audio_files(str(tmp_path), exclude=[str(tmp_path / "out")]).files == ["a.wav"]


def test_an_output_subfolder_linking_into_the_input_is_not_written_through(tmp_path):
    write_wav(str(tmp_path / "in" / "sub" / "x.wav"), np.full(100, 0.25, dtype=np.float32), 16000)
    os.makedirs(str(tmp_path / "out"))
    os.symlink(str(tmp_path / "in" / "sub"), str(tmp_path / "out" / "sub"))
    before = tree_digest(str(tmp_path / "in"))
    result = convert_folder(str(tmp_path / "in"), str(tmp_path / "out"), lambda rel, a, sr: (a * 0, sr),
                            overwrite=True, progress=False, writer="test")
    assert tree_digest(str(tmp_path / "in")) == before
    assert list(result.failed) == [os.path.join("sub", "x.wav")]
    assert "leads out of the output folder" in result.failed[os.path.join("sub", "x.wav")]


# ----- convert_folder: one error boundary per file, progress, resumable -----

RECORD = record_name("test")  # the writer's record of the files it wrote

@pytest.fixture
def three_files(tmp_path):
    for k, rel in enumerate(["a.wav", "b.wav", os.path.join("sub", "c.wav")]):
        write_wav(str(tmp_path / "in" / rel), np.full(200 + k, 0.1, dtype=np.float32), 16000)
    return str(tmp_path / "in"), str(tmp_path / "out")


def test_one_failing_file_is_named_and_the_others_are_written(three_files):
    in_root, out_root = three_files

    def convert(rel, audio, rate):
        if rel == "b.wav":
            raise RuntimeError("padding size should be less than the input dimension")
        return audio, rate

    result = convert_folder(in_root, out_root, convert, progress=False, writer="test")
    assert result.written == ["a.wav", os.path.join("sub", "c.wav")]
    assert list(result.failed) == ["b.wav"]
    reason = result.failed["b.wav"]
    assert os.path.join(in_root, "b.wav") in reason and "RuntimeError" in reason and "padding" in reason
    assert sorted(os.listdir(out_root)) == [RECORD, LOCK_FILE, "a.wav", "sub"]


def test_a_non_finite_result_fails_that_file_by_name_and_the_others_are_written(three_files):
    in_root, out_root = three_files

    def convert(rel, audio, rate):
        return (np.full_like(audio, np.inf) if rel == "b.wav" else audio), rate

    result = convert_folder(in_root, out_root, convert, progress=False, writer="test")
    assert result.written == ["a.wav", os.path.join("sub", "c.wav")]
    assert list(result.failed) == ["b.wav"]
    reason = result.failed["b.wav"]
    assert os.path.join(out_root, "b.wav") + ": the audio to write has 201 NaN or infinite sample(s)" in reason
    assert sorted(os.listdir(out_root)) == [RECORD, LOCK_FILE, "a.wav", "sub"]


def test_an_interruption_is_not_swallowed_and_a_rerun_resumes(three_files):
    in_root, out_root = three_files

    def interrupted(rel, audio, rate):
        if rel == "b.wav":
            raise KeyboardInterrupt
        return audio, rate

    with pytest.raises(KeyboardInterrupt):
        convert_folder(in_root, out_root, interrupted, progress=False, writer="test")
    assert sorted(os.listdir(out_root)) == [RECORD, LOCK_FILE, "a.wav"]  # written whole, nothing half-written beside it
    result = convert_folder(in_root, out_root, lambda rel, a, sr: (a, sr), progress=False, writer="test")
    assert result.skipped == ["a.wav"] and result.written == ["b.wav", os.path.join("sub", "c.wav")]


def test_a_failed_write_stops_the_run_with_the_file_named(three_files, monkeypatch):
    in_root, out_root = three_files
    fill_disk(monkeypatch, after=1)
    with pytest.raises(OutputError, match="b.wav.*System error"):
        convert_folder(in_root, out_root, lambda rel, a, sr: (a, sr), progress=False, writer="test")
    assert sorted(os.listdir(out_root)) == [RECORD, LOCK_FILE, "a.wav"]


def test_progress_bar_counts_files(three_files, capsys):
    in_root, out_root = three_files
    convert_folder(in_root, out_root, lambda rel, a, sr: (a, sr), progress=True, desc="copying", writer="test")
    err = capsys.readouterr().err
    assert "copying" in err and "3/3" in err


# ----- records read whoever wrote them -----

@pytest.mark.parametrize("bomb", ["laughs", "recursive"])
def test_a_hostile_run_record_is_no_record_and_costs_nothing(tmp_path, bomb):
    """A config.yml with the refiner's keys and an alias bomb: a billion nested keys, or a
    mapping holding itself. Read as a record, anything that walks it never ends or recurses
    without end; it is no record of ours, and its folder is input like any other."""
    folder = tmp_path / "refined"
    touch(str(folder / "a.wav"))
    lines = ["diffiner_version: 0.1.0", "refiner: {method: diffiner+}"]
    if bomb == "laughs":
        lines += ["l0: &l0 {x: 1, y: 1}"] + [f"l{k}: &l{k} {{" + ", ".join(f"k{j}: *l{k - 1}" for j in range(10)) + "}"
                                             for k in range(1, 10)]
    else:
        lines += ["model: &m {self: *m}"]
    (folder / RUN_RECORD).write_text("\n".join(lines) + "\n")
    with deadline(5):
        assert read_run_record(str(folder)) is None
        assert list_audio_files(str(tmp_path)) == [os.path.join("refined", "a.wav")]


# ----- one run per output folder -----

def test_a_lock_file_left_behind_is_not_a_lock_and_is_never_listed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text('{"writer": "w", "pid": 999999999, "host": "gone", "started": "then"}\n')
    touch(str(out / "a.wav"))
    with output_lock(str(out), "v"):
        record = json.loads((out / LOCK_FILE).read_text())
        assert (record["writer"], record["pid"], record["host"]) == ("v", os.getpid(), socket.gethostname())
        with output_lock(str(out), "v"):  # the same thread again: a writer calling another writer
            pass
        refused = []
        thread = threading.Thread(target=lambda: refused.append(pytest.raises(FolderError, output_lock(
            str(out), "u").__enter__).value))
        thread.start()
        thread.join(10)
        assert len(refused) == 1 and f"in use by v (pid {os.getpid()}" in str(refused[0])
    assert scan_audio_files(str(out)).files == ["a.wav"]
    assert earlier_writer(str(out)) == "v"


@pytest.mark.parametrize("plant", ["fifo", "hard link"])
def test_a_lock_file_that_is_not_a_plain_file_of_its_own_is_refused_at_once(tmp_path, plant):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's")
    if plant == "fifo":
        os.mkfifo(str(out / LOCK_FILE))
    else:
        os.link(str(victim), str(out / LOCK_FILE))
    with deadline(5):
        with pytest.raises(FolderError, match="not a plain file of its own"):
            with output_lock(str(out), "w"):
                pass
    assert victim.read_text() == "someone else's"
