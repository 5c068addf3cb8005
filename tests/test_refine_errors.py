"""Every way a refinement (or a sampling) run can go wrong ends in one line on stderr naming the
problem, status 2 for what was asked and 1 for a run with failed files; one file's failure never
stops the others; folders that could trap a walk (links back up, FIFOs) do not hang it."""

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from diffiner import checkpoints
from diffiner.commands import refine, sample_prior
from diffiner.errors import UsageError
from diffiner.pipeline import Refiner

from conftest import speech_like, tiny_cli_flags, write_wav
from fs_helpers import deadline, deny_listing, deny_writing, fill_disk, output_digest, tree_digest

FILES = ["a.wav", os.path.join("sub", "b.wav"), os.path.join("sub", "c.wav")]


@pytest.fixture
def corpus(tmp_path):
    for k, rel in enumerate(FILES):
        clean = speech_like(0.3 + 0.1 * k, 16000, seed=k)
        write_wav(str(tmp_path / "noisy" / rel), clean + 0.01, 16000)
        write_wav(str(tmp_path / "proc" / rel), 0.9 * clean, 16000)
    return tmp_path


def run(corpus, checkpoint, *extra, respacing="ddim2"):
    return refine.main(["--root-noisy", str(corpus / "noisy"), "--root-proc", str(corpus / "proc"),
                        "--output-dir", str(corpus / "out"), "--model-path", checkpoint, "--no-gpu",
                        "--no-progress", *tiny_cli_flags(respacing), *extra])


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


USAGE_ERRORS = {
    "loaders 0": (["--loaders", "0"], "--loaders"),
    "max-dur nan": (["--max-dur", "nan"], "--max-dur"),
    "max-dur inf": (["--max-dur", "inf"], "--max-dur"),
    "max-dur 0": (["--max-dur", "0"], "--max-dur"),
    "overlap nan": (["--segment-overlap", "nan"], "--segment-overlap"),
    "overlap >= max-dur": (["--max-dur", "2", "--segment-overlap", "2"], "--segment-overlap"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "frame budget 0": (["--max-batch-frames", "0"], "--max-batch-frames"),
    "dist timeout 0": (["--dist-timeout", "0"], "--dist-timeout"),
}


@pytest.mark.parametrize("flags, named", USAGE_ERRORS.values(), ids=list(USAGE_ERRORS))
def test_bad_flags_are_one_line_with_status_2_before_any_work(corpus, tiny_checkpoint, capsys, flags, named):
    assert run(corpus, tiny_checkpoint, *flags) == 2
    assert named in error_line(capsys.readouterr().err)
    assert not (corpus / "out").exists()


@pytest.mark.parametrize("respacing", ["0", "-5", "ddim0", "ddim-3", "abc", "10,0"])
def test_bad_respacing_is_one_line_with_status_2(corpus, tiny_checkpoint, capsys, respacing):
    assert run(corpus, tiny_checkpoint, respacing=respacing) == 2
    line = error_line(capsys.readouterr().err)
    assert "--timestep-respacing" in line and respacing in line
    assert not (corpus / "out").exists()


def run_on(corpus, checkpoint, device, *extra):
    return refine.main(["--root-noisy", str(corpus / "noisy"), "--root-proc", str(corpus / "proc"),
                        "--output-dir", str(corpus / "out"), "--model-path", checkpoint, "--device", device,
                        *tiny_cli_flags(), *extra])


@pytest.mark.parametrize("device, named", [("banana", "not a torch device"), ("cuda:99", "cuda:99"),
                                           ("meta", "--device meta: not usable here")])
def test_an_unknown_device_is_one_line(corpus, tiny_checkpoint, capsys, device, named):
    assert run_on(corpus, tiny_checkpoint, device) == 2
    assert named in error_line(capsys.readouterr().err)
    assert not (corpus / "out").exists()


def test_cuda_graphs_off_cuda_is_one_line_before_anything_is_written(corpus, tiny_checkpoint, capsys):
    assert run_on(corpus, tiny_checkpoint, "cpu", "--cuda-graphs") == 2
    assert "--cuda-graphs needs a CUDA device (this run is on cpu)" in error_line(capsys.readouterr().err)
    assert not (corpus / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_line(corpus, tiny_checkpoint, capsys):
    assert run_on(corpus, tiny_checkpoint, "cuda") == 2
    assert "CUDA is not available" in error_line(capsys.readouterr().err)
    assert not (corpus / "out").exists()


def test_debug_shows_the_traceback_instead(corpus, tiny_checkpoint):
    with pytest.raises(UsageError, match="banana"):
        run_on(corpus, tiny_checkpoint, "banana", "--debug")


def test_a_checkpoint_that_cannot_be_read_is_one_line_with_status_2(corpus, tiny_checkpoint, monkeypatch, capsys):
    def corrupt(path):
        raise ValueError(f"{path}: truncated or corrupt checkpoint")

    monkeypatch.setattr(checkpoints, "load_state_dict", corrupt)
    assert run(corpus, tiny_checkpoint) == 2
    assert "truncated or corrupt" in error_line(capsys.readouterr().err)


def test_one_file_failing_anywhere_in_its_processing_fails_alone(corpus, tiny_checkpoint, monkeypatch, capsys):
    real = Refiner.stream_segments

    def stream_segments(self, layout, noisy, processed, seed=0, key=""):
        if key == FILES[1]:
            raise RuntimeError("Argument #4: Padding size should be less than the corresponding input dimension")
        return real(self, layout, noisy, processed, seed=seed, key=key)

    monkeypatch.setattr(Refiner, "stream_segments", stream_segments)
    assert run(corpus, tiny_checkpoint) == 1
    err = capsys.readouterr().err
    assert f"FAILED {FILES[1]}:" in err and "RuntimeError" in err and "Traceback" not in err
    assert sorted(output_digest(str(corpus / "out"))) == sorted([FILES[0], FILES[2], "config.yml", "summary.json"])
    summary = json.load(open(corpus / "out" / "summary.json"))
    assert summary["refined"] == 2 and list(summary["failed"]) == [FILES[1]]


def test_a_100_sample_file_does_not_stop_the_others(corpus, tiny_checkpoint, capsys):
    """A file shorter than the network's minimum input is padded to it for the network, and its
    refinement cut back to its own length: refined like any other, not failed."""
    write_wav(str(corpus / "noisy" / "tiny.wav"), np.full(100, 0.1, dtype=np.float32), 16000)
    write_wav(str(corpus / "proc" / "tiny.wav"), np.full(100, 0.05, dtype=np.float32), 16000)
    code = run(corpus, tiny_checkpoint, "--keep-sample-rate")
    err = capsys.readouterr().err
    assert "FAILED" not in err and "Traceback" not in err, err
    assert code == 0
    for rel in FILES:
        assert sf.info(str(corpus / "out" / rel)).frames == sf.info(str(corpus / "proc" / rel)).frames
    info = sf.info(str(corpus / "out" / "tiny.wav"))
    assert (info.frames, info.samplerate, info.channels) == (100, 16000, 1)
    refined, _ = sf.read(str(corpus / "out" / "tiny.wav"), dtype="float32")
    assert np.isfinite(refined).all()
    summary = json.load(open(corpus / "out" / "summary.json"))
    assert summary["refined"] == len(FILES) + 1 and not summary["failed"]


def test_a_full_disk_stops_the_run_with_one_line(corpus, tiny_checkpoint, monkeypatch, capsys):
    fill_disk(monkeypatch, after=1)
    assert run(corpus, tiny_checkpoint, "--batch-size", "1") == 1
    line = error_line(capsys.readouterr().err)
    assert "System error" in line and str(corpus / "out") in line
    assert not [name for name in os.listdir(corpus / "out") if name.startswith(".tmp-")]


def test_a_read_only_output_folder_is_one_line_before_any_work(corpus, tiny_checkpoint, monkeypatch, capsys):
    deny_writing(monkeypatch, str(corpus / "out"))
    assert run(corpus, tiny_checkpoint) == 2
    line = error_line(capsys.readouterr().err)
    assert str(corpus / "out") in line and "Permission denied" in line
    assert tree_digest(str(corpus / "out")) == {}


def test_a_header_promising_more_samples_than_the_file_holds_is_warned(corpus, tiny_checkpoint, caplog):
    path = corpus / "proc" / FILES[0]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 2000])  # 1000 samples of 16-bit mono gone, header unchanged
    promised = sf.info(str(corpus / "noisy" / FILES[0])).frames
    held = promised - 1000
    assert run(corpus, tiny_checkpoint, "--keep-sample-rate") == 0
    warning = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert warning and str(promised) in warning[0] and str(held) in warning[0]
    assert sf.info(str(corpus / "out" / FILES[0])).frames == held


def test_an_unreadable_folder_fails_the_run_and_is_named(corpus, tiny_checkpoint, monkeypatch, capsys, caplog):
    deny_listing(monkeypatch, str(corpus / "proc" / "sub"))
    assert run(corpus, tiny_checkpoint) == 1
    err = capsys.readouterr().err
    assert str(corpus / "proc" / "sub") in err and "Permission denied" in err
    assert "no counterpart" not in caplog.text  # not blamed on the files it holds
    assert os.path.exists(corpus / "out" / FILES[0])


def test_links_looping_back_and_fifos_neither_hang_nor_duplicate(corpus, tiny_checkpoint, caplog):
    for side in ("noisy", "proc"):
        os.symlink("..", str(corpus / side / "sub" / "loop"))
        os.symlink(".", str(corpus / side / "self"))
    os.mkfifo(str(corpus / "proc" / "z.wav"))
    write_wav(str(corpus / "noisy" / "z.wav"), speech_like(0.2, 16000), 16000)
    with deadline(120):
        code = run(corpus, tiny_checkpoint)
    summary = json.load(open(corpus / "out" / "summary.json"))
    assert summary["refined"] == len(FILES)
    assert code == 0
    assert any(str(corpus / "proc" / "z.wav") in r.getMessage() and "not a regular file" in r.getMessage()
               for r in caplog.records)


def test_sampling_errors_are_one_line_with_status_2(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    def sample(*extra, respacing="ddim2"):
        return sample_prior.main(["--model_path", tiny_checkpoint, "--output_dir", str(tmp_path / "s"),
                                  "--num_samples", "1", "--seconds", "0.1", *tiny_cli_flags(respacing), *extra])

    assert sample("--device", "banana") == 2
    assert "banana" in error_line(capsys.readouterr().err)
    assert sample("--device", "cpu", respacing="0") == 2
    assert "--timestep-respacing" in error_line(capsys.readouterr().err)
    assert sample("--device", "cpu", "--seconds", "nan") == 2
    assert "--seconds" in error_line(capsys.readouterr().err)
    assert sample_prior.main(["--model_path", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in error_line(capsys.readouterr().err)

    def corrupt(path):
        raise ValueError(f"{path}: truncated or corrupt checkpoint")

    monkeypatch.setattr(checkpoints, "load_state_dict", corrupt)
    assert sample("--device", "cpu") == 2
    assert "truncated or corrupt" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_a_file_the_baseline_cannot_make_fails_the_run(corpus, tiny_checkpoint, capsys):
    pytest.importorskip("noisereduce")
    (corpus / "noisy" / "broken.wav").write_bytes(b"RIFF not audio")
    code = refine.main(["--root-noisy", str(corpus / "noisy"), "--baseline", "noisereduce", "--root-proc",
                        str(corpus / "nr"), "--model-path", tiny_checkpoint, "--no-gpu", "--no-progress",
                        *tiny_cli_flags()])
    err = capsys.readouterr().err
    assert code == 1 and "FAILED broken.wav: baseline noisereduce:" in err and "Traceback" not in err
    refined = corpus / "nr" / "diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6"
    assert all((refined / rel).is_file() for rel in FILES)


def test_a_file_name_that_is_not_utf8_is_refined_like_any_other(corpus, tiny_checkpoint, capsys):
    # Issue 21 item 10: a Latin-1 name on a UTF-8 system (Python holds its byte 0xE9 as the
    # surrogate escape U+DCE9, which soundfile and the seed's hash refused to encode) was
    # reported as unreadable.
    name = os.fsdecode(b"caf\xe9 take.wav")
    for side in ("noisy", "proc"):  # soundfile takes such a name as bytes only
        sf.write(os.fsencode(corpus / side / name), 0.5 * speech_like(0.3, 16000, seed=9), 16000)
    assert run(corpus, tiny_checkpoint) == 0, capsys.readouterr().err
    summary = json.load(open(corpus / "out" / "summary.json"))
    assert summary["refined"] == len(FILES) + 1 and summary["failed"] == {}
    assert b"caf\xe9 take.wav" in os.listdir(os.fsencode(corpus / "out"))
    data, rate = sf.read(os.fsencode(corpus / "out" / name))
    assert rate == 16000 and data.shape == (4800,) and np.abs(data).max() > 0


def test_seeds_of_utf8_keys_are_unchanged_by_the_escape_handling():
    import hashlib

    from diffiner.seeding import derive_seed

    for key in ("a.wav", "sub/ü €.wav"):
        text = f"7\x00{key}\x000\x001"
        assert derive_seed(7, key, 0, 1) == int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    assert derive_seed(7, os.fsdecode(b"caf\xe9.wav")) != derive_seed(7, os.fsdecode(b"caf\xe8.wav"))
