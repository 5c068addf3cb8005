import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from diffiner import __version__
from diffiner.acceleration import default_execution
from diffiner.audio.folders import LOCK_FILE, REFINE_WRITER
from diffiner.audio.records import record_name
from diffiner.commands.refine import main, parse_etas
from diffiner.pipeline import MethodSettings

from conftest import speech_like, tiny_cli_flags, tiny_model_and_diffusion, write_wav
from fs_helpers import output_digest
from launchers import REPO, launcher_env, mpiexec_or_skip, torchrun


def make_pair(root, rel, seconds, rate, channels=1, seed=0):
    clean = speech_like(seconds, rate, seed)
    noise = 0.05 * np.random.default_rng(seed + 1).standard_normal(clean.size).astype(np.float32)
    noisy, processed = clean + noise, 0.9 * clean
    if channels == 2:
        noisy, processed = np.stack([noisy, noisy * 0.5]), np.stack([processed, processed * 0.5])
    write_wav(os.path.join(root, "noisy", rel), noisy, rate)
    write_wav(os.path.join(root, "proc", rel), processed, rate)


@pytest.fixture
def corpus(tmp_path):
    root = str(tmp_path)
    make_pair(root, "a8k.wav", 1.0, 8000, seed=1)
    make_pair(root, "spk1/b16k.wav", 1.2, 16000, seed=2)
    make_pair(root, "spk1/deep/c44k.wav", 0.9, 44100, seed=3)
    make_pair(root, "spk2/d48k_stereo.wav", 1.1, 48000, channels=2, seed=4)
    make_pair(root, "short.wav", 0.2, 16000, seed=5)
    write_wav(os.path.join(root, "noisy", "only_noisy.wav"), speech_like(0.5), 16000)
    write_wav(os.path.join(root, "proc", "only_proc.wav"), speech_like(0.5), 16000)
    write_wav(os.path.join(root, "noisy", "broken.wav"), speech_like(0.5), 16000)
    with open(os.path.join(root, "proc", "broken.wav"), "wb") as f:
        f.write(b"RIFF this is not audio")
    return root


def run(corpus, tiny_checkpoint, *extra):
    return main(["--root-noisy", os.path.join(corpus, "noisy"), "--root_proc", os.path.join(corpus, "proc"),
                 "--model-path", tiny_checkpoint, "--no-gpu", "--no-progress",
                 "--batch-size", "4", *tiny_cli_flags(), *extra])


def test_end_to_end_on_a_messy_corpus(corpus, tiny_checkpoint, capsys):
    out_dir = os.path.join(corpus, "proc", "diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6")
    assert run(corpus, tiny_checkpoint) == 1
    captured = capsys.readouterr()
    assert "broken.wav" in captured.err
    valid = ["a8k.wav", "spk1/b16k.wav", "spk1/deep/c44k.wav", "spk2/d48k_stereo.wav", "short.wav"]
    for rel in valid:
        out, rate = sf.read(os.path.join(out_dir, rel), always_2d=True)
        info = sf.info(os.path.join(corpus, "proc", rel))
        assert rate == 16000 and sf.info(os.path.join(out_dir, rel)).subtype == "PCM_16"
        assert out.shape[0] == round(info.frames * 16000 / info.samplerate), rel
        assert out.shape[1] == info.channels
        assert np.abs(out).max() > 0
    assert not os.path.exists(os.path.join(out_dir, "broken.wav"))
    assert not os.path.exists(os.path.join(out_dir, "only_noisy.wav"))
    config = yaml.safe_load(open(os.path.join(out_dir, "config.yml")))
    assert config["refiner"]["eta_b"] == 0.6 and config["seed"] == 0 and config["device"] == "cpu"
    # What ran: the CPU's default precision and layout (test_cpu_defaults.py), and the thread count.
    precision, channels_last = default_execution(torch.device("cpu"))
    assert config["stft"]["n_fft"] == 512 and config["dtype"] == precision
    assert config["acceleration"]["channels_last"] is channels_last
    assert config["acceleration"]["threads"] == torch.get_num_threads()
    first = sf.read(os.path.join(out_dir, "short.wav"))[0]

    # A rerun pairs the same files (the output folder inside root-proc is not input) and skips them all.
    assert run(corpus, tiny_checkpoint) == 1
    assert "5 already done" in capsys.readouterr().out
    os.remove(os.path.join(corpus, "proc", "broken.wav"))
    assert run(corpus, tiny_checkpoint) == 0
    # Nothing to do: no real-time factor to speak of, and summary.json stays valid JSON.
    assert "nan" not in capsys.readouterr().out.lower()
    with open(os.path.join(out_dir, "summary.json")) as f:
        assert json.loads(f.read(), parse_constant=lambda name: pytest.fail(name))["real_time_factor"] is None
    # --overwrite redoes them, with the same result: nothing depends on batch composition.
    mtime = os.path.getmtime(os.path.join(out_dir, "short.wav"))
    assert run(corpus, tiny_checkpoint, "--overwrite", "--batch-size", "1") == 0
    assert os.path.getmtime(os.path.join(out_dir, "short.wav")) >= mtime
    assert "refined 5 file(s)" in capsys.readouterr().out
    np.testing.assert_allclose(sf.read(os.path.join(out_dir, "short.wav"))[0], first, atol=2 / 32768)


def test_keep_sample_rate_gives_the_exact_input_length(corpus, tiny_checkpoint):
    out_dir = os.path.join(corpus, "out")
    assert run(corpus, tiny_checkpoint, "--keep-sample-rate", "--output-dir", out_dir, "--simple-diffiner") == 1
    for rel in ["a8k.wav", "spk1/deep/c44k.wav", "spk2/d48k_stereo.wav"]:
        ref = sf.info(os.path.join(corpus, "proc", rel))
        got = sf.info(os.path.join(out_dir, rel))
        assert (got.frames, got.samplerate, got.channels) == (ref.frames, ref.samplerate, ref.channels)


@pytest.mark.slow
def test_a_long_file_is_refined_in_segments_without_losing_audio(tmp_path, tiny_checkpoint):
    make_pair(str(tmp_path), "long.flac", 25.0, 16000, seed=6)
    out_dir = str(tmp_path / "out")
    assert run(str(tmp_path), tiny_checkpoint, "--max-dur", "4", "--output-dir", out_dir) == 0
    out, rate = sf.read(os.path.join(out_dir, "long.flac"))
    assert rate == 16000 and out.shape == (25 * 16000,)
    # Every second of the output carries signal: nothing was cut or left silent.
    seconds = out.reshape(25, 16000)
    assert (np.abs(seconds).max(axis=1) > 1e-3).all()


def test_no_pair_at_all_is_an_error(tmp_path, tiny_checkpoint, capsys):
    write_wav(str(tmp_path / "n" / "a.wav"), speech_like(0.3), 16000)
    write_wav(str(tmp_path / "p" / "b.wav"), speech_like(0.3), 16000)
    code = main(["--root-noisy", str(tmp_path / "n"), "--root-proc", str(tmp_path / "p"),
                 "--model-path", tiny_checkpoint, "--no-gpu", *tiny_cli_flags()])
    assert code == 2 and "no audio file" in capsys.readouterr().err


def test_etas_and_output_folder_name():
    assert parse_etas("diffiner+", [0.4, 0.6, 0.0, 0.6]) == dict(eta_a=0.4, eta_b=0.6, eta_c=0.0, eta_d=0.6)
    assert MethodSettings("diffiner").folder_name == "diffiner_etaA=0.9_etaB=0.9"
    assert MethodSettings("ddim", {"eta": 1}).folder_name == "ddim_eta=1.0"
    with pytest.raises(ValueError):
        parse_etas("diffiner", [0.1, 0.2, 0.3])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_two_process_sharded_run_equals_a_single_process_run_bit_for_bit(tmp_path, tiny_checkpoint, launcher):
    launch = torchrun if launcher == "torchrun" else mpiexec_or_skip()
    root = str(tmp_path)
    for k, seconds in enumerate([0.4, 1.3, 0.7, 2.1, 0.5, 0.9]):
        make_pair(root, f"s{k % 2}/f{k}.wav", seconds, 16000, seed=k)
    script = os.path.join(REPO, "scripts", "run_refiner.py")
    common = ["--root-noisy", os.path.join(root, "noisy"), "--root-proc", os.path.join(root, "proc"),
              "--model-path", tiny_checkpoint, "--no-gpu", "--no-progress", *tiny_cli_flags()]
    # Both runs use one thread per process (launcher_env): the float summation order then matches.
    single = subprocess.run([sys.executable, script, *common, "--output-dir", os.path.join(root, "single")],
                            env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    result = subprocess.run(launch(script, *common, "--output-dir", os.path.join(root, "sharded")),
                            env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: refined" in result.stdout and "rank 1: refined" in result.stdout
    summary = json.load(open(os.path.join(root, "sharded", "summary.json")))
    assert summary["refined"] == 6 and summary["processes"] == 2
    for k in range(6):
        rel = f"s{k % 2}/f{k}.wav"
        with open(os.path.join(root, "single", rel), "rb") as a, open(os.path.join(root, "sharded", rel), "rb") as b:
            assert a.read() == b.read(), rel
    # Every process's files are in the one record (their log folded in by process 0): a rerun of
    # the job has nothing to do.
    record = json.load(open(os.path.join(root, "sharded", record_name(REFINE_WRITER))))
    assert sorted(record["files"]) == sorted(f"s{k % 2}/f{k}.wav" for k in range(6))
    assert not os.path.exists(os.path.join(root, "sharded", record_name(REFINE_WRITER) + ".log"))
    again = subprocess.run(launch(script, *common, "--output-dir", os.path.join(root, "sharded")),
                           env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 file(s) to refine, 6 already done" in again.stdout, again.stderr[-3000:]


def test_duration_balanced_sharding():
    from diffiner.corpus import FileJob, shard_jobs

    jobs = [FileJob(f"{k}.wav", "", "", "", width=32, seconds=s) for k, s in enumerate([9, 1, 1, 1, 1, 1, 1, 1, 1, 1])]
    shards = [shard_jobs(jobs, rank, 2) for rank in range(2)]
    assert sorted(j.rel for shard in shards for j in shard) == sorted(j.rel for j in jobs)
    assert [sum(j.seconds for j in shard) for shard in shards] == [9, 9]


def test_baseline_makes_the_processed_files_and_refines_them(tmp_path, tiny_checkpoint, capsys):
    pytest.importorskip("noisereduce")
    make_pair(str(tmp_path), "a.wav", 1.0, 16000, seed=1)
    make_pair(str(tmp_path), "sub/b.wav", 0.8, 22050, seed=2)
    base = str(tmp_path / "nr")
    code = main(["--root-noisy", str(tmp_path / "noisy"), "--baseline", "noisereduce", "--root-proc", base,
                 "--model-path", tiny_checkpoint, "--no-gpu", "--no-progress", *tiny_cli_flags()])
    assert code == 0
    assert "2 written" in capsys.readouterr().out
    refined = os.path.join(base, "diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6")
    for rel in ["a.wav", "sub/b.wav"]:
        assert sf.info(os.path.join(base, rel)).frames == sf.info(os.path.join(str(tmp_path), "noisy", rel)).frames
        assert os.path.exists(os.path.join(refined, rel))


# ----- config.yml describes the files beside it -----

@pytest.mark.slow
def other_precision() -> str:
    """A precision that the CPU does not run by default (bf16 is the default on a CPU with native
    bf16, fp32 elsewhere), so that naming it changes the folder's settings."""
    return "fp32" if default_execution(torch.device("cpu"))[0] == "bf16" else "bf16"


def test_a_rerun_with_other_settings_is_refused_and_overwrite_redoes_every_file(tmp_path, tiny_checkpoint, capsys):
    root = str(tmp_path)
    for k in range(3):
        make_pair(root, f"f{k}.wav", 0.4 + 0.1 * k, 16000, seed=k)
    out = str(tmp_path / "out")
    assert run(root, tiny_checkpoint, "--output-dir", out) == 0
    config_path = os.path.join(out, "config.yml")
    config = yaml.safe_load(open(config_path))
    assert config["model_sha256"] == hashlib.sha256(open(tiny_checkpoint, "rb").read()).hexdigest()
    assert config["diffiner_version"] == __version__ and config["seed"] == 0
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out) if name != LOCK_FILE}
    capsys.readouterr()

    other_model = str(tmp_path / "other.pt")
    torch.save(tiny_model_and_diffusion(seed=1)[0].state_dict(), other_model)
    for extra, named in [(["--seed", "1"], "seed"), (["--timestep-respacing", "ddim3"], "timestep_respacing"),
                         (["--simple-diffiner"], "method"), (["--etas", "0.5"], "eta_a"),
                         (["--keep-sample-rate"], "output_sample_rate"), (["--precision", other_precision()], "dtype"),
                         (["--model-path", other_model], "model_sha256")]:
        code = main(["--root-noisy", os.path.join(root, "noisy"), "--root-proc", os.path.join(root, "proc"),
                     "--model-path", tiny_checkpoint, "--no-gpu", "--no-progress", *tiny_cli_flags(),
                     "--output-dir", out, *extra])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and named in errors[0] and out in errors[0], (extra, err)
        assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)
                if name != LOCK_FILE} == before, extra

    # The same settings resume; another batch size is no reason to refuse. A run with nothing to
    # do leaves the record as it was; one that adds files adds itself to the runs.
    assert run(root, tiny_checkpoint, "--output-dir", out, "--batch-size", "1") == 0
    assert "3 already done" in capsys.readouterr().out
    assert len(yaml.safe_load(open(config_path))["runs"]) == 1
    os.remove(os.path.join(out, "f1.wav"))
    assert run(root, tiny_checkpoint, "--output-dir", out, "--batch-size", "1") == 0
    assert "1 file(s) to refine, 2 already done" in capsys.readouterr().out
    runs = yaml.safe_load(open(config_path))["runs"]
    assert [r["files"] for r in runs] == [3, 1] and runs[1]["device"] == "cpu"

    # --overwrite with other settings redoes every file, drops the files of the old settings that
    # the new run does not make (f2.wav: its pair is gone) and nothing else (the user's own
    # mine.wav, issue 21 item 8), and config.yml then records the new settings only.
    with open(os.path.join(out, "mine.wav"), "wb") as f:
        f.write(before["f0.wav"])
    for side in ("noisy", "proc"):
        os.remove(os.path.join(root, side, "f2.wav"))
    assert run(root, tiny_checkpoint, "--output-dir", out, "--seed", "1", "--overwrite") == 0
    assert "removed 3 file(s) refined with other settings" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "f2.wav"))
    assert open(os.path.join(out, "mine.wav"), "rb").read() == before["f0.wav"]
    config = yaml.safe_load(open(config_path))
    assert config["seed"] == 1 and len(config["runs"]) == 1
    assert all(open(os.path.join(out, f"f{k}.wav"), "rb").read() != before[f"f{k}.wav"] for k in range(2))


def test_a_folder_of_audio_that_no_run_recorded_is_not_written_into(tmp_path, tiny_checkpoint, capsys):
    make_pair(str(tmp_path), "a.wav", 0.4, 16000)
    out = tmp_path / "out"
    write_wav(str(out / "a.wav"), speech_like(0.4), 16000)
    before = (out / "a.wav").read_bytes()
    for extra in ([], ["--overwrite"]):  # not even --overwrite: they are not ours to replace
        assert run(str(tmp_path), tiny_checkpoint, "--output-dir", str(out), *extra) == 2
        assert "no refinement recorded" in capsys.readouterr().err
        assert list(output_digest(str(out))) == ["a.wav"] and (out / "a.wav").read_bytes() == before


# ----- a previous refinement nested in the processed folder is not input -----

def test_the_second_method_does_not_list_the_first_ones_outputs(corpus, tiny_checkpoint, capsys, caplog):
    os.remove(os.path.join(corpus, "proc", "broken.wav"))
    os.remove(os.path.join(corpus, "proc", "only_proc.wav"))
    assert run(corpus, tiny_checkpoint) == 0
    caplog.clear()
    capsys.readouterr()
    assert run(corpus, tiny_checkpoint, "--simple-diffiner") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and not any("diffiner+_eta" in w for w in warnings), warnings
    assert "refined 5 file(s), skipped 0, failed 0" in capsys.readouterr().out


def test_a_baseline_run_refuses_a_root_proc_holding_files_the_baseline_did_not_make(tmp_path, tiny_checkpoint,
                                                                                       capsys):
    """They would be skipped as "already made" and refined, under a config.yml recording
    baseline: noisereduce."""
    pytest.importorskip("noisereduce")
    make_pair(str(tmp_path), "a.wav", 0.5, 16000, seed=1)  # proc/a.wav: the user's own enhanced file
    proc = str(tmp_path / "proc")

    def files():  # but the lock files the runs leave
        return {rel: d for rel, d in output_digest(proc).items() if os.path.basename(rel) != LOCK_FILE}

    before = files()
    code = main(["--root-noisy", str(tmp_path / "noisy"), "--baseline", "noisereduce", "--root-proc", proc,
                 "--model-path", tiny_checkpoint, "--no-gpu", "--no-progress", *tiny_cli_flags()])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "a.wav" in err and "no diffiner-enhance run" in err, err
    assert files() == before  # nothing refined, nothing recorded


def test_a_project_moved_whole_reruns_and_a_different_root_is_still_refused(tmp_path, tiny_checkpoint, capsys):
    """Roots are compared by where they lie from the output folder as well as by their absolute
    paths: a project folder moved (or reached by another path) is the same project."""
    old = tmp_path / "old"
    for k in range(2):
        make_pair(str(old / "project"), f"f{k}.wav", 0.3, 16000, seed=k)
    assert run(str(old / "project"), tiny_checkpoint, "--output-dir", str(old / "project" / "out")) == 0
    # The output folder moved alone: the roots are where they were.
    os.rename(old / "project" / "out", old / "out")
    capsys.readouterr()
    assert run(str(old / "project"), tiny_checkpoint, "--output-dir", str(old / "out")) == 0
    assert "0 file(s) to refine, 2 already done" in capsys.readouterr().out
    # Everything moved: the roots lie where they lay from the output folder.
    new = tmp_path / "elsewhere" / "new"
    new.parent.mkdir()
    os.rename(old, new)
    assert run(str(new / "project"), tiny_checkpoint, "--output-dir", str(new / "out")) == 0
    assert "0 file(s) to refine, 2 already done" in capsys.readouterr().out
    # Another noisy folder is another run, wherever it lies.
    shutil.copytree(new / "project" / "noisy", new / "project" / "noisy2")
    code = main(["--root-noisy", str(new / "project" / "noisy2"), "--root-proc", str(new / "project" / "proc"),
                 "--output-dir", str(new / "out"), "--model-path", tiny_checkpoint, "--no-gpu", "--no-progress",
                 *tiny_cli_flags()])
    err = capsys.readouterr().err
    assert code == 2 and "data.root_noisy" in err and len(err.strip().splitlines()) == 1
