"""One file instead of a folder on the command line (issue 16 item 2): `diffiner-refine
--root-noisy a.wav --root-proc b.wav` and `diffiner-enhance a.wav OUT`, under the folders' rules:
config guard, resume, never writing onto an input, one-line errors. Also the shortest input
(issue 21 item 6: one sample at 48 kHz gave an empty file counted as refined)."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import yaml

from diffiner.audio.folders import REFINE_WRITER, RUN_RECORD
from diffiner.audio.records import record_name
from diffiner.commands import enhance, refine

from conftest import speech_like, tiny_cli_flags, write_wav

FOLDER_NAME = "diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6"


def make_files(folder, noisy_name="noisy take 1.wav", processed_name="enhanced take 1.wav", rate=22050,
               seconds=0.4):
    clean = speech_like(seconds, rate, seed=2)
    noise = 0.05 * np.random.default_rng(3).standard_normal(clean.size).astype(np.float32)
    paths = str(folder / noisy_name), str(folder / processed_name)
    write_wav(paths[0], clean + noise, rate)
    write_wav(paths[1], 0.9 * clean, rate)
    return paths


def run_refine(checkpoint, noisy, processed, *extra):
    return refine.main(["--root-noisy", noisy, "--root-proc", processed, "--model-path", checkpoint, "--no-gpu",
                        "--no-progress", *tiny_cli_flags(), *extra])


def test_two_files_with_spaces_are_refined_into_the_output_folder(tmp_path, tiny_checkpoint, capsys):
    noisy, processed = make_files(tmp_path)
    out = tmp_path / "out dir"
    assert run_refine(tiny_checkpoint, noisy, processed, "--output-dir", str(out), "--keep-sample-rate") == 0
    assert sorted(os.listdir(out)) == sorted([".diffiner.lock", record_name(REFINE_WRITER), RUN_RECORD, "summary.json",
                                              "enhanced take 1.wav"])
    data, rate = sf.read(str(out / "enhanced take 1.wav"))
    assert rate == 22050 and data.shape == sf.read(processed)[0].shape
    record = yaml.safe_load((out / RUN_RECORD).read_text())
    assert record["data"]["root_proc"] == processed and record["data"]["root_noisy"] == noisy
    capsys.readouterr()
    # Resumed: the file is there, nothing to do.
    before = (out / "enhanced take 1.wav").read_bytes()
    assert run_refine(tiny_checkpoint, noisy, processed, "--output-dir", str(out), "--keep-sample-rate") == 0
    assert "0 file(s) to refine, 1 already done" in capsys.readouterr().out
    assert (out / "enhanced take 1.wav").read_bytes() == before
    # The config guard: other settings into the same folder are refused, in one line.
    assert run_refine(tiny_checkpoint, noisy, processed, "--output-dir", str(out), "--keep-sample-rate",
                      "--seed", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "seed" in err and "\n" not in err
    assert (out / "enhanced take 1.wav").read_bytes() == before


def test_the_default_output_folder_lies_beside_the_processed_file(tmp_path, tiny_checkpoint):
    noisy, processed = make_files(tmp_path / "in")
    assert run_refine(tiny_checkpoint, noisy, processed) == 0
    data, rate = sf.read(str(tmp_path / "in" / FOLDER_NAME / "enhanced take 1.wav"))
    assert rate == 16000 and len(data) == round(0.4 * 16000)


@pytest.mark.parametrize("case", ["file and folder", "folder and file", "missing", "same file",
                                  "output onto the inputs' folder"])
def test_unusable_single_file_arguments_are_refused_in_one_line(tmp_path, tiny_checkpoint, capsys, case):
    noisy, processed = make_files(tmp_path)
    digest = {p: open(p, "rb").read() for p in (noisy, processed)}
    args = {"file and folder": (noisy, str(tmp_path)), "folder and file": (str(tmp_path), processed),
            "missing": (str(tmp_path / "nothing here.wav"), processed), "same file": (processed, processed),
            "output onto the inputs' folder": (noisy, processed, "--output-dir", str(tmp_path))}[case]
    assert run_refine(tiny_checkpoint, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert {p: open(p, "rb").read() for p in (noisy, processed)} == digest
    assert not os.path.exists(tmp_path / FOLDER_NAME)


def test_a_baseline_makes_the_processed_file_of_one_noisy_file(tmp_path, tiny_checkpoint, monkeypatch):
    noisy, _ = make_files(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    assert run_refine(tiny_checkpoint, noisy, "made by baseline", "--baseline", "none") == 0
    np.testing.assert_array_equal(sf.read("made by baseline/noisy take 1.wav")[0], sf.read(noisy)[0])
    assert os.path.isfile(os.path.join("made by baseline", FOLDER_NAME, "noisy take 1.wav"))


def test_a_one_sample_pair_gives_a_one_sample_output(tmp_path, tiny_checkpoint):
    noisy, processed = str(tmp_path / "noisy.wav"), str(tmp_path / "enhanced take 1.wav")
    write_wav(noisy, np.array([0.3], dtype=np.float32), 48000)
    write_wav(processed, np.array([0.25], dtype=np.float32), 48000)
    assert run_refine(tiny_checkpoint, noisy, processed, "--output-dir", str(tmp_path / "out")) == 0
    assert sf.info(str(tmp_path / "out" / "enhanced take 1.wav")).frames == 1


# ----- diffiner-enhance -----

def run_enhance(*args):
    return enhance.main([*args, "--enhancer", "none", "--no-progress"])


def test_enhance_one_file_into_a_folder_and_onto_a_file_name(tmp_path, capsys):
    noisy, _ = make_files(tmp_path)
    assert run_enhance(noisy, str(tmp_path / "out dir")) == 0
    written = tmp_path / "out dir" / "noisy take 1.wav"
    np.testing.assert_array_equal(sf.read(str(written))[0], sf.read(noisy)[0])  # "none": the noisy audio
    assert run_enhance(noisy, str(tmp_path / "my enhanced.flac")) == 0
    assert sf.info(str(tmp_path / "my enhanced.flac")).format == "FLAC"
    # Resumed: an output that this writer recorded is kept.
    before = (tmp_path / "my enhanced.flac").read_bytes()
    capsys.readouterr()
    assert run_enhance(noisy, str(tmp_path / "my enhanced.flac")) == 0
    assert "0 written, 1 already there" in capsys.readouterr().out
    assert (tmp_path / "my enhanced.flac").read_bytes() == before
    # A file of the user's at the output name is not replaced unasked.
    (tmp_path / "kept.wav").write_bytes(b"not touched")
    assert run_enhance(noisy, str(tmp_path / "kept.wav")) == 2
    err = capsys.readouterr().err.strip()
    assert "no diffiner-enhance run recorded (e.g. kept.wav)" in err and "\n" not in err
    assert (tmp_path / "kept.wav").read_bytes() == b"not touched"


@pytest.mark.parametrize("onto", ["itself", "a link to it", "its folder"])
def test_enhance_never_writes_onto_its_input_file(tmp_path, capsys, onto):
    noisy, _ = make_files(tmp_path)
    before = open(noisy, "rb").read()
    out = {"itself": noisy, "its folder": str(tmp_path)}.get(onto)
    if onto == "a link to it":
        out = str(tmp_path / "link.wav")
        os.symlink(noisy, out)
    assert run_enhance(noisy, out, "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "input" in err
    assert open(noisy, "rb").read() == before


# ----- the README's "your own audio" lines, verbatim -----

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def own_audio_lines():
    """The one-file command and the Python lines that follow "or on your own audio" in README.md."""
    text = open(README).read()
    part = text[text.index("or on your own audio"):]
    command = re.search(r"```bash\n(diffiner-refine [^\n]*)\n```", part).group(1)
    python = re.search(r"```python\n(.*?)```", part, re.DOTALL).group(1)
    return command, python


@pytest.mark.slow  # two subprocesses, each refining with the default 200 steps
def test_the_readme_lines_for_your_own_audio_run_verbatim(tmp_path, carried_tiny_checkpoint):
    command, python = own_audio_lines()
    assert "--root-noisy noisy.wav --root-proc enhanced.wav" in command and "refine_file" in python
    assert "--model-path published" in command and 'from_pretrained("published")' in python
    work = tmp_path / "work"
    work.mkdir()
    # The cached copy of the published weights: the tiny model, with its settings beside it.
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(carried_tiny_checkpoint, cache / "pretrained_diffiner_onVB.pt")
    shutil.copy(os.path.join(os.path.dirname(carried_tiny_checkpoint), "model_config.yml"), cache)
    make_files(work, "noisy.wav", "enhanced.wav", rate=16000, seconds=0.3)
    # The console scripts lie beside the interpreter that runs the tests.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               DIFFINER_CACHE=str(cache))
    subprocess.run(["bash", "-c", command], cwd=work, env=env, check=True,
                   capture_output=True, timeout=300)
    refined = work / FOLDER_NAME / "enhanced.wav"
    assert sf.info(str(refined)).frames == round(0.3 * 16000)
    subprocess.run([sys.executable, "-c", python], cwd=work, env=env, check=True,
                   capture_output=True, timeout=300)
    assert sf.info(str(work / "refined.wav")).frames == round(0.3 * 16000)
