"""Every writer keeps the refiner's rule (issue 16 item 4, issue 21 item 8): a rerun with the same
settings skips what is done, other settings are refused in one line, --overwrite redoes all and
deletes only the files its record lists; a file whose input changed since it was written is
redone; a file that no run recorded is never replaced unasked."""

import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

from diffiner.audio.records import CHANGED, DONE, NEW, UNLISTED, OutputRecord, fingerprint, record_name
from diffiner.commands import enhance, make_noisy_set, refine, resample_audio, sample_prior

from conftest import speech_like, tiny_cli_flags, write_wav
from fs_helpers import deadline, output_digest, tree_digest


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def pairs(root, names=("a.wav", os.path.join("sub", "b.wav")), rate=16000):
    """noisy/ and proc/ under `root`, one pair per name; returns (noisy, proc)."""
    for k, rel in enumerate(names):
        clean = speech_like(0.3, rate, seed=k)
        write_wav(os.path.join(root, "noisy", rel), clean + 0.01 * np.sin(np.arange(clean.size)).astype(np.float32),
                  rate)
        write_wav(os.path.join(root, "proc", rel), 0.9 * clean, rate)
    return os.path.join(root, "noisy"), os.path.join(root, "proc")


# One entry per writer: run(tmp, out, other_settings, *extra) -> exit status, and the files a run
# writes. `other_settings` switches one setting that shapes every file.
def run_refine(tmp, checkpoint, out, other, *extra):
    noisy, proc = os.path.join(tmp, "noisy"), os.path.join(tmp, "proc")
    return refine.main(["--root-noisy", noisy, "--root-proc", proc, "--model-path", checkpoint, "--no-gpu",
                        "--no-progress", *tiny_cli_flags(), "--output-dir", out, "--seed", "1" if other else "0",
                        *extra])


def run_enhance(tmp, checkpoint, out, other, *extra):
    pytest.importorskip("noisereduce")
    return enhance.main([os.path.join(tmp, "noisy"), out, "--enhancer", "noisereduce" if other else "none",
                         "--no-progress", *extra])


def run_resample(tmp, checkpoint, out, other, *extra):
    return resample_audio.main([os.path.join(tmp, "noisy"), out, "--rate", "8000" if other else "12000",
                                "--no-progress", *extra])


def run_noisy_set(tmp, checkpoint, out, other, *extra):
    return make_noisy_set.main([os.path.join(tmp, "noisy"), out, "--seed", "1" if other else "0", "--no-progress",
                                *extra])


def run_sample(tmp, checkpoint, out, other, *extra):
    return sample_prior.main(["--model-path", checkpoint, "--output-dir", out, "--num-samples", "2", "--seconds",
                              "0.1", "--device", "cpu", *tiny_cli_flags("ddim2"), "--seed", "1" if other else "0",
                              "--no-progress", *extra])


WRITERS = {
    "refine": (run_refine, ["a.wav", os.path.join("sub", "b.wav")]),
    "enhance": (run_enhance, ["a.wav", os.path.join("sub", "b.wav")]),
    "resample": (run_resample, ["a.wav", os.path.join("sub", "b.wav")]),
    "make_noisy_set": (run_noisy_set, ["a.wav", os.path.join("sub", "b.wav")]),
    "sample": (run_sample, ["sample_000.wav", "sample_001.wav"]),
}


def audio_digest(out):
    """`output_digest` of the audio files only (not summary.json, conditions.csv, config.yml)."""
    return {rel: digest for rel, digest in output_digest(out).items() if rel.endswith((".wav", ".flac"))}


def user_files(out):
    """The user's own files in an output folder, matching no input: --overwrite must keep them."""
    write_wav(os.path.join(out, "listening_test", "a.wav"), speech_like(0.1, seed=7), 16000)
    write_wav(os.path.join(out, "mine.flac"), speech_like(0.1, seed=8), 16000)
    return {rel: digest for rel, digest in tree_digest(out).items()
            if rel.startswith("listening_test") or rel == "mine.flac"}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_writer_skips_refuses_and_overwrites(writer, tmp_path, tiny_checkpoint, capsys):
    run, outputs = WRITERS[writer]
    tmp = str(tmp_path)
    pairs(tmp)
    out = str(tmp_path / "out")
    assert run(tmp, tiny_checkpoint, out, False) == 0
    first = output_digest(out)
    assert sorted(rel for rel in first if rel.endswith(".wav")) == outputs
    mtimes = {rel: os.stat(os.path.join(out, rel)).st_mtime_ns for rel in outputs}
    capsys.readouterr()

    # The same settings: everything is done, nothing is written again.
    assert run(tmp, tiny_checkpoint, out, False) == 0
    said = capsys.readouterr().out
    assert re.search(r"(skipped|already there|already done)\D*2\b|\b2 already (there|done)", said), said
    assert {rel: os.stat(os.path.join(out, rel)).st_mtime_ns for rel in outputs} == mtimes

    # Other settings: refused in one line naming the folder, nothing touched.
    mine = user_files(out)
    before = output_digest(out)
    assert run(tmp, tiny_checkpoint, out, True) == 2
    line = one_error_line(capsys.readouterr().err)
    assert out in line and "other settings" in line and "--overwrite" in line
    assert output_digest(out) == before

    # --overwrite: every output redone with the new settings, the user's own files kept.
    assert run(tmp, tiny_checkpoint, out, True, "--overwrite") == 0
    after = output_digest(out)
    assert all(after[rel] != first[rel] for rel in outputs), writer
    assert {rel: after[rel] for rel in mine} == mine
    capsys.readouterr()
    assert run(tmp, tiny_checkpoint, out, True) == 0  # and the new settings resume
    assert {rel: output_digest(out)[rel] for rel in outputs} == {rel: after[rel] for rel in outputs}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_file_no_run_recorded_is_not_replaced_unasked(writer, tmp_path, tiny_checkpoint, capsys):
    """The user's file where a new output would go, in a folder the writer resumes: refused in
    one line naming it; --overwrite replaces it (and only then)."""
    run, outputs = WRITERS[writer]
    tmp = str(tmp_path)
    pairs(tmp)
    out = str(tmp_path / "out")
    assert run(tmp, tiny_checkpoint, out, False) == 0
    if writer == "sample":
        new, more = "sample_002.wav", ["--num-samples", "3"]
    else:
        pairs(tmp, names=["c.wav"])
        new, more = "c.wav", []
    write_wav(os.path.join(out, new), np.zeros(100, np.float32), 16000)
    before = output_digest(out)
    assert run(tmp, tiny_checkpoint, out, False, *more) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no {'make_noisy_set' if writer == 'make_noisy_set' else 'diffiner-' + writer} run recorded" in line
    assert f"e.g. {new}" in line
    assert output_digest(out) == before
    assert run(tmp, tiny_checkpoint, out, False, *more, "--overwrite") == 0
    assert sf.read(os.path.join(out, new))[0].any()


# ----- an input that changed since its output was written -----

@pytest.mark.parametrize("writer", ["refine", "enhance", "resample", "make_noisy_set"])
def test_a_changed_input_is_redone_and_a_copied_one_is_not(writer, tmp_path, tiny_checkpoint, capsys):
    run, outputs = WRITERS[writer]
    tmp = str(tmp_path)
    noisy, proc = pairs(tmp)
    out = str(tmp_path / "out")
    assert run(tmp, tiny_checkpoint, out, False) == 0
    first = audio_digest(out)
    # The same bytes with a new mtime (a copied or restored folder): nothing to redo.
    for root in (noisy, proc):
        for rel in outputs:
            os.utime(os.path.join(root, rel), ns=(1, 1))
    capsys.readouterr()
    assert run(tmp, tiny_checkpoint, out, False) == 0
    assert "input changed" not in capsys.readouterr().out
    assert audio_digest(out) == first
    # New content in one input: its output is redone, the other is skipped.
    changed = os.path.join(proc if writer == "refine" else noisy, "a.wav")
    write_wav(changed, 0.5 * speech_like(0.3, 16000, seed=5), 16000)
    assert run(tmp, tiny_checkpoint, out, False) == 0
    said = capsys.readouterr().out
    assert re.search(r"1 (redone|because)", said) and "input changed" in said, said
    again = audio_digest(out)
    assert again["a.wav"] != first["a.wav"] and again[outputs[1]] == first[outputs[1]]


def test_a_noisy_set_made_anew_makes_its_enhanced_files_redone(tmp_path, capsys):
    """The issue's case: after make_noisy_set with another seed (--overwrite), the files enhanced
    from the old noisy set are no longer 'already there'."""
    tmp = str(tmp_path)
    pairs(tmp)
    clean, noisy, enhanced = os.path.join(tmp, "noisy"), str(tmp_path / "set"), str(tmp_path / "enhanced")
    assert make_noisy_set.main([clean, noisy, "--no-progress"]) == 0
    assert enhance.main([noisy, enhanced, "--enhancer", "none", "--no-progress"]) == 0
    first = output_digest(enhanced)
    assert make_noisy_set.main([clean, noisy, "--no-progress", "--seed", "1"]) == 2
    assert "seed: 0 -> 1" in one_error_line(capsys.readouterr().err)
    assert make_noisy_set.main([clean, noisy, "--no-progress", "--seed", "1", "--overwrite"]) == 0
    capsys.readouterr()
    assert enhance.main([noisy, enhanced, "--enhancer", "none", "--no-progress"]) == 0
    assert "2 written (2 because their input changed), 0 already there" in capsys.readouterr().out
    assert all(output_digest(enhanced)[rel] != first[rel] for rel in first)


def test_the_conditions_file_lists_every_noisy_file_of_a_resumed_set(tmp_path, capsys):
    tmp = str(tmp_path)
    pairs(tmp)
    out = str(tmp_path / "set")
    assert make_noisy_set.main([os.path.join(tmp, "noisy"), out, "--no-progress"]) == 0
    conditions = open(os.path.join(out, "conditions.csv")).read()
    os.remove(os.path.join(out, "a.wav"))
    assert make_noisy_set.main([os.path.join(tmp, "noisy"), out, "--no-progress"]) == 0
    assert "1 written, 1 already there" in capsys.readouterr().out
    assert open(os.path.join(out, "conditions.csv")).read() == conditions
    assert conditions.count("\n") == 3  # header and both files


# ----- --overwrite deletes only what its record lists (issue 21 item 8) -----

def test_overwrite_into_a_refined_folder_keeps_the_users_own_audio(tmp_path, tiny_checkpoint, capsys):
    """Replacing a folder refined with other settings deleted every audio file under it,
    out/listening_test/*.wav and out/mine.flac included."""
    tmp = str(tmp_path)
    pairs(tmp)
    out = str(tmp_path / "out")
    assert run_refine(tmp, tiny_checkpoint, out, False) == 0
    mine = user_files(out)
    assert run_refine(tmp, tiny_checkpoint, out, True, "--overwrite") == 0
    assert "removed 2 file(s) refined with other settings" in capsys.readouterr().out
    assert {rel: tree_digest(out)[rel] for rel in mine} == mine


# ----- the record itself -----

def test_the_record_keeps_every_file_added_even_when_never_saved_and_ignores_a_torn_line(tmp_path):
    folder = str(tmp_path)
    for name in ("a.wav", "b.wav", "in.wav"):
        write_wav(os.path.join(folder, name), speech_like(0.05), 16000)
    inputs = {"input": os.path.join(folder, "in.wav")}
    record = OutputRecord.open(folder, "w", {"x": 1}, overwrite=False)
    record.add("a.wav", {"input": fingerprint(inputs["input"])})
    record.add("b.wav", {"input": fingerprint(inputs["input"])}, made={"colour": ("pink",)})
    with open(record.journal_path, "a") as f:
        f.write('{"rel": "c.wav", "entry": {"inp')  # a run killed in the middle of a line
    # Killed before saving: read back from the log.
    again = OutputRecord.read(folder, "w")
    assert sorted(again.files) == ["a.wav", "b.wav"] and again.settings == {"x": 1}
    assert again.state("a.wav", inputs) == DONE
    assert again.state("b.wav", inputs, {"colour": ["pink"]}) == DONE
    assert again.state("b.wav", inputs, {"colour": ["white"]}) == CHANGED
    assert again.state("c.wav", inputs) == NEW
    write_wav(os.path.join(folder, "c.wav"), speech_like(0.05), 16000)
    assert again.state("c.wav", inputs) == UNLISTED
    write_wav(inputs["input"], speech_like(0.06), 16000)
    assert again.state("a.wav", inputs) == CHANGED
    again.save()
    assert not os.path.exists(again.journal_path)
    saved = json.load(open(os.path.join(folder, record_name("w"))))
    assert sorted(saved["files"]) == ["a.wav", "b.wav"] and saved["writer"] == "w"


@pytest.mark.parametrize("content", ["not json {", "[1, 2]", '{"writer": "other", "files": {}}'])
def test_a_record_that_is_not_ours_lists_nothing(tmp_path, content):
    """A planted or broken record counts as none: its files are then unlisted, never deleted."""
    (tmp_path / record_name("w")).write_text(content)
    write_wav(str(tmp_path / "a.wav"), speech_like(0.05), 16000)
    record = OutputRecord.read(str(tmp_path), "w")
    assert record.files == {} and record.state("a.wav", {}) == UNLISTED
    assert record.remove_written() == 0 and (tmp_path / "a.wav").exists()


def test_two_runs_into_one_record_at_once_keep_each_others_files(tmp_path):
    """Runs of one file each into a shared folder take no folder lock (nor do the processes of a
    torchrun job among themselves): whichever saves last, the record lists both files."""
    folder = str(tmp_path)
    write_wav(os.path.join(folder, "in.wav"), speech_like(0.05), 16000)
    first = OutputRecord.open(folder, "w", {"x": 1}, overwrite=False)
    second = OutputRecord.open(folder, "w", {"x": 1}, overwrite=False)
    first.add("a.wav", {"input": fingerprint(os.path.join(folder, "in.wav"))})
    second.add("b.wav", {"input": fingerprint(os.path.join(folder, "in.wav"))})
    first.save()
    second.save()
    assert sorted(OutputRecord.read(folder, "w").files) == ["a.wav", "b.wav"]
    # A record of other settings is not merged into: its files are not this run's.
    other = OutputRecord(folder, "w", {"x": 2})
    other.add("c.wav", {})
    other.save()
    assert sorted(OutputRecord.read(folder, "w").files) == ["c.wav"]


def test_a_fifo_planted_as_the_records_log_does_not_hang_the_run(tmp_path, capsys):
    """Opening a FIFO blocks until someone opens its other end: the log is read non-blocking and
    checked (a warning names it), and the run goes on."""
    tmp = str(tmp_path)
    pairs(tmp)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(str(out / (record_name("diffiner-resample") + ".log")))
    with deadline(60):
        assert resample_audio.main([os.path.join(tmp, "noisy"), str(out), "--no-progress"]) == 0
    assert sorted(OutputRecord.read(str(out), "diffiner-resample").files) == ["a.wav", os.path.join("sub", "b.wav")]
