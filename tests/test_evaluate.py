"""Tests of the evaluation command (diffiner.commands.evaluate) on small generated folders."""

import csv
import json
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile as sf

from diffiner.audio.io import resample, save_audio
from diffiner.errors import UsageError
from diffiner.commands.evaluate import main
from diffiner.evaluation import run as evaluation_run
from diffiner.evaluation import scoring
from diffiner.evaluation.run import EvaluationSetup, choose_plot_files
from diffiner.evaluation.scoring import ALL_METRICS, METRIC_BACKENDS, EvaluationError, resolve_metrics

from conftest import snr_folders, speech_like, with_noise, write_wav
from fs_helpers import deny_listing

SR = 16000
# One DNSMOS window after speechmos's tiling (2.4 s doubles to 9.6 s): keeps the tests fast.
SECONDS = 2.4
FILES = ("a.wav", os.path.join("sub", "b.wav"))
SNRS = {"noisy": 0.0, "sysA": 10.0, "sysB": 25.0}


@pytest.fixture(autouse=True)
def no_nisqa_weights(tmp_path, monkeypatch):
    """An empty home folder: torchmetrics' NISQA cache (~/.torchmetrics) holds no weights, so the
    default metrics do not depend on what this machine has downloaded."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def corpus(tmp_path: Path) -> Dict[str, Path]:
    """clean/ plus noisy/ (0 dB), sysA/ (10 dB) and sysB/ (25 dB SNR), each with FILES."""
    return snr_folders(tmp_path, FILES, SNRS, SECONDS, SR)


def base_args(corpus: Dict[str, Path], output: Path, *systems: str) -> List[str]:
    """--clean plus the named systems, scored in-process."""
    args = ["--clean", str(corpus["clean"]), "--output-dir", str(output), "--workers", "1"]
    for name in systems:
        args += ["--system", f"{name}={corpus[name]}"]
    return args


def read_rows(output: Path) -> List[Dict[str, str]]:
    with open(output / "per_file.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_end_to_end_writes_all_outputs(corpus, tmp_path, capsys):
    output = tmp_path / "results"
    argv = [
        "--clean", str(corpus["clean"]), "--noisy", str(corpus["noisy"]),
        "--system", f"sysA={corpus['sysA']}", "--system", f"sysB={corpus['sysB']}",
        "--output-dir", str(output), "--workers", "2",
    ]
    assert main(argv) == 0

    rows = read_rows(output)
    assert {(r["file"], r["system"]) for r in rows} == {
        (f, s) for f in FILES for s in ("noisy", "sysA", "sysB")
    }
    assert list(rows[0]) == [
        "file", "system", "pesq", "estoi", "sisdr",
        "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808", "floored", "not_scored", "failed",
    ]

    summary = json.loads((output / "summary.json").read_text())
    assert list(summary) == ["noisy", "sysA", "sysB"]
    assert summary["sysA"]["pesq"]["n"] == 2
    assert summary["sysA"]["pesq"] == {**summary["sysA"]["pesq"], "floored": 0, "not_scored": 0}
    assert set(summary["sysA"]["pesq"]) == {"mean", "ci95", "n", "floored", "not_scored"}
    for metric in ("pesq", "estoi", "sisdr"):
        assert summary["sysB"][metric]["mean"] > summary["noisy"][metric]["mean"]

    markdown = (output / "summary.md").read_text()
    for name in ("noisy", "sysA", "sysB"):
        assert f"| {name} |" in markdown
    assert " ± " in markdown
    assert markdown in capsys.readouterr().out

    from matplotlib.image import imread

    image = imread(output / "spectrograms.png")
    # 4 sources (rows of 1.8 in: clean, noisy, sysA, sysB) x 2 files (columns of 4 in) at 100 dpi
    assert image.shape[:2] == (720, 800)
    assert not list(output.glob(".tmp-*"))


def test_length_mismatch_over_10ms_names_the_pair(corpus, tmp_path, capsys):
    enhanced = with_noise(speech_like(SECONDS, seed=0), 10.0, seed=3)
    longer = np.concatenate([enhanced, np.zeros(320, np.float32)])  # 20 ms longer than clean
    save_audio(str(corpus["sysA"] / "a.wav"), longer, SR)
    output = tmp_path / "results"
    assert main(base_args(corpus, output, "sysA") + ["--metrics", "sisdr"]) == 2
    error = capsys.readouterr().err
    assert str(corpus["clean"] / "a.wav") in error
    assert str(corpus["sysA"] / "a.wav") in error
    assert not (output / "per_file.csv").exists()


def test_length_difference_within_10ms_is_trimmed(corpus, tmp_path):
    clean = speech_like(SECONDS, seed=0)
    save_audio(str(corpus["sysA"] / "a.wav"), clean[:-80], SR)  # 5 ms short
    output = tmp_path / "results"
    assert main(base_args(corpus, output, "sysA") + ["--metrics", "sisdr"]) == 0
    scores = {r["file"]: float(r["sisdr"]) for r in read_rows(output)}
    assert scores["a.wav"] > 30.0


def test_a_file_a_system_lacks_is_floored_for_that_system_and_written_down(corpus, tmp_path, capsys):
    """Every system is scored over the same files: one that sysB lacks is sysB's failure (every
    score floored, counted, the reason in per_file.csv), not a file dropped from every mean."""
    os.remove(corpus["sysB"] / FILES[1])
    output = tmp_path / "results"
    argv = base_args(corpus, output, "sysA", "sysB") + ["--metrics", "sisdr", "--plot-files", FILES[1]]
    assert main(argv) == 0  # the figure and the page show the missing file without stopping the run
    printed = capsys.readouterr().out
    assert "sysB" in printed and FILES[1] in printed
    rows = {(r["file"], r["system"]): r for r in read_rows(output)}
    assert set(rows) == {(f, s) for f in FILES for s in ("sysA", "sysB")}
    lacking = rows[(FILES[1], "sysB")]
    assert (float(lacking["sisdr"]), lacking["floored"], lacking["failed"]) == (-50.0, "sisdr", "missing")
    assert rows[(FILES[1], "sysA")]["failed"] == "" and float(rows[(FILES[1], "sysA")]["sisdr"]) > 0.0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sysA"]["sisdr"]["n"] == summary["sysB"]["sisdr"]["n"] == len(FILES)
    assert (summary["sysA"]["sisdr"]["floored"], summary["sysB"]["sisdr"]["floored"]) == (0, 1)
    assert f"sysB: {FILES[1]} (missing)" in (output / "summary.md").read_text()


def test_a_file_without_a_clean_reference_is_left_out_of_the_intrusive_metrics_for_every_system(corpus, tmp_path):
    """extra.wav is only in sysA: clean lacks it, so SI-SDR cannot score it for any system; sysB
    lacks it too, which is sysB's failure all the same (its other metrics would be floored)."""
    save_audio(str(corpus["sysA"] / "extra.wav"), speech_like(SECONDS, seed=4), SR)
    output = tmp_path / "results"
    assert main(base_args(corpus, output, "sysA", "sysB") + ["--metrics", "sisdr"]) == 0
    rows = {(r["file"], r["system"]): r for r in read_rows(output)}
    assert [(rows[("extra.wav", s)]["not_scored"], rows[("extra.wav", s)]["failed"]) for s in ("sysA", "sysB")] == [
        ("sisdr", ""), ("sisdr", "missing")]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sysA"]["sisdr"] == {**summary["sysA"]["sisdr"], "n": len(FILES), "not_scored": 1}
    assert "clean reference" in (output / "summary.md").read_text()


@pytest.mark.slow  # DNSMOS, three evaluations
def test_without_a_clean_reference_near_silence_is_judged_by_the_noisy_input_or_the_nominal_level(corpus, tmp_path):
    dithered_like_folder(corpus["noisy"], tmp_path / "dither", seed=8)
    system = ["--system", f"dither={tmp_path / 'dither'}", "--metrics", "dnsmos", "--workers", "1"]
    by_noisy = ["--noisy", str(corpus["noisy"]), "--output-dir", str(tmp_path / "by_noisy")]
    assert main(system + by_noisy) == 0
    nominal = ["--output-dir", str(tmp_path / "nominal")]
    assert main(system + nominal) == 0
    for output, words in ((tmp_path / "by_noisy", "below the noisy input's level"),
                          (tmp_path / "nominal", "below the nominal speech level (-26 dB re full scale)")):
        rows = [r for r in read_rows(output) if r["system"] == "dither"]
        assert len(rows) == len(FILES) and all(words in r["failed"] for r in rows), output
        assert json.loads((output / "summary.json").read_text())["dither"]["dnsmos_ovrl"]["floored"] == len(FILES)
    # A quiet but real output is scored, not floored: speech at -20 dB re full scale times 0.03 is
    # at -52 dB, 26 dB below the nominal level, within the 40 dB limit.
    quiet = tmp_path / "quiet"
    for relative in FILES:
        save_audio(str(quiet / relative), 0.03 * speech_like(SECONDS, seed=9), SR)
    assert main(["--system", f"quiet={quiet}", "--metrics", "dnsmos", "--workers", "1",
                 "--output-dir", str(tmp_path / "quiet_results")]) == 0
    assert all(r["failed"] == "" for r in read_rows(tmp_path / "quiet_results"))


def test_a_folder_that_cannot_be_listed_is_named_and_its_files_still_scored(corpus, tmp_path, monkeypatch):
    """sysB/sub cannot be listed: its files are still in the list (the other folders have them),
    every system is scored over the same files, and summary.md names the folder."""
    deny_listing(monkeypatch, str(corpus["sysB"] / "sub"))
    output = tmp_path / "results"
    assert main(base_args(corpus, output, "sysA", "sysB") + ["--metrics", "sisdr"]) == 0
    assert {(r["file"], r["system"]) for r in read_rows(output)} == {(f, s) for f in FILES for s in ("sysA", "sysB")}
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sysA"]["sisdr"]["n"] == summary["sysB"]["sisdr"]["n"] == len(FILES)
    assert str(corpus["sysB"] / "sub") in (output / "summary.md").read_text()


def test_a_nan_sample_floors_that_file_only(corpus, tmp_path, capsys):
    """One NaN sample in sysA/a.wav: that file of sysA is floored on every metric and counted;
    its other file and the other system are scored as usual, and the run ends with exit 0."""
    audio = sf.read(str(corpus["sysA"] / "a.wav"), dtype="float32")[0]
    audio[1000] = np.nan
    write_wav(str(corpus["sysA"] / "a.wav"), audio, SR, "FLOAT")  # save_audio would refuse it
    output = tmp_path / "results"
    assert main(base_args(corpus, output, "sysA", "sysB") + ["--metrics", "estoi,sisdr"]) == 0
    rows = {(r["file"], r["system"]): r for r in read_rows(output)}
    broken = rows[("a.wav", "sysA")]
    assert (float(broken["estoi"]), float(broken["sisdr"]), broken["floored"]) == (0.0, -50.0, "estoi sisdr")
    assert "NaN" in broken["failed"]
    assert all(rows[key]["failed"] == "" and rows[key]["floored"] == "" for key in rows if key != ("a.wav", "sysA"))
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sysA"]["sisdr"] == {**summary["sysA"]["sisdr"], "n": len(FILES), "floored": 1}
    assert (output / "report.html").is_file()


def test_48khz_multichannel_files_are_resampled_and_mixed_to_mono(corpus, tmp_path):
    clean = speech_like(SECONDS, seed=0)
    at_48k = resample(clean, SR, 48000)
    offset = 0.2 * np.random.default_rng(5).standard_normal(at_48k.size).astype(np.float32)
    # The channels differ, but their average is the clean signal: only a mono mix scores high.
    stereo = np.stack([at_48k + offset, at_48k - offset])
    save_audio(str(corpus["sysA"] / "a.wav"), stereo, 48000, "FLOAT")
    output = tmp_path / "results"
    argv = base_args(corpus, output, "sysA") + ["--metrics", "pesq,sisdr", "--plot-files", "a.wav"]
    assert main(argv) == 0
    row = next(r for r in read_rows(output) if r["file"] == "a.wav")
    assert float(row["sisdr"]) > 30.0
    assert float(row["pesq"]) > 4.0


def zeros_like_folder(source: Path, target: Path) -> None:
    """target/ mirrors source/ with all-zero files of the same lengths."""
    for relative in FILES:
        length = sf.info(str(source / relative)).frames
        save_audio(str(target / relative), np.zeros(length, np.float32), SR)


def test_silent_system_never_beats_the_noisy_input(corpus, tmp_path):
    """A system that outputs silence is penalised with every metric's floor, over the same files
    as every other system; it never scores above the noisy input it was given."""
    zeros_like_folder(corpus["noisy"], tmp_path / "silent")
    output = tmp_path / "results"
    argv = base_args(corpus, output) + ["--noisy", str(corpus["noisy"]), "--system", f"silent={tmp_path / 'silent'}"]
    assert main(argv) == 0
    summary = json.loads((output / "summary.json").read_text())
    columns = ["pesq", "estoi", "sisdr", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"]
    floors = {"pesq": 1.0, "estoi": 0.0, "sisdr": -50.0}
    for column in columns:
        silent, noisy = summary["silent"][column], summary["noisy"][column]
        assert silent["n"] == noisy["n"] == len(FILES), column
        assert silent["floored"] == len(FILES), column
        assert silent["mean"] == floors.get(column, 1.0), column
        assert silent["mean"] <= noisy["mean"], column
    rows = [r for r in read_rows(output) if r["system"] == "silent"]
    assert all(r["floored"].split() == columns for r in rows)
    assert all(r["not_scored"] == "" and r["failed"] == "the scored signal is silent" for r in rows)
    markdown = (output / "summary.md").read_text()
    assert "| silent |" in markdown and "floored" in markdown
    assert "was silent or near-silent" in markdown
    assert "the metric was undefined for it, or the score was lower" in markdown
    assert f"silent: a.wav (the scored signal is silent), {FILES[1]} (the scored signal is silent)" in markdown


def dithered_like_folder(source: Path, target: Path, seed: int) -> None:
    """target/ mirrors source/ with 16-bit files of ±1 LSB dither (samples -1, 0 or 1 of 32768),
    about 92 dB below full scale: near-silence that is not exactly constant."""
    rng = np.random.default_rng(seed)
    for relative in FILES:
        length = sf.info(str(source / relative)).frames
        write_wav(str(target / relative), rng.integers(-1, 2, length).astype(np.float32) / 32768, SR)


def test_dithered_near_silence_never_beats_the_noisy_input(corpus, tmp_path):
    """PESQ and DNSMOS rescale their input, so ±1 LSB of dither scored above the noisy input
    while nothing was floored. Over 40 dB below the clean reference it is floored on every metric."""
    dithered_like_folder(corpus["noisy"], tmp_path / "dither", seed=7)
    output = tmp_path / "results"
    argv = base_args(corpus, output) + ["--noisy", str(corpus["noisy"]), "--system", f"dither={tmp_path / 'dither'}"]
    assert main(argv) == 0
    summary = json.loads((output / "summary.json").read_text())
    columns = ["pesq", "estoi", "sisdr", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"]
    for column in columns:
        dither, noisy = summary["dither"][column], summary["noisy"][column]
        assert dither["floored"] == dither["n"] == len(FILES), column
        assert dither["mean"] <= noisy["mean"] and noisy["floored"] == 0, column
    rows = [r for r in read_rows(output) if r["system"] == "dither"]
    assert all(r["floored"].split() == columns and "below the clean reference" in r["failed"] for r in rows)


def test_silent_reference_leaves_the_file_out_for_every_system(corpus, tmp_path, caplog):
    """A silent clean reference makes the intrusive metrics undefined for the file itself: it is
    left out of them for every system, with a warning, and still scored by DNSMOS."""
    save_audio(str(corpus["clean"] / "a.wav"), np.zeros(int(SECONDS * SR), np.float32), SR)
    output = tmp_path / "results"
    argv = base_args(corpus, output, "sysA") + ["--noisy", str(corpus["noisy"])]
    assert main(argv) == 0
    summary = json.loads((output / "summary.json").read_text())
    for system in ("noisy", "sysA"):
        for column in ("pesq", "estoi", "sisdr"):
            assert summary[system][column]["n"] == 1 and summary[system][column]["not_scored"] == 1
            assert summary[system][column]["floored"] == 0
        assert summary[system]["dnsmos_ovrl"]["n"] == 2
    for row in read_rows(output):
        if row["file"] == "a.wav":
            assert row["not_scored"].split() == ["pesq", "estoi", "sisdr"]
            assert all(row[c] == "nan" for c in ("pesq", "estoi", "sisdr"))
        else:
            assert row["not_scored"] == ""
    assert any("a.wav" in m and "clean reference" in m for m in caplog.messages)
    assert "not scored for any system" in (output / "summary.md").read_text().lower()


def test_scores_below_the_floor_are_raised_to_it_and_counted(corpus, tmp_path, caplog):
    """Time-reversed clean speech is not silence: its scores are computed, then its ESTOI (a
    negative correlation) and SI-SDR (about -105 dB) are raised to their floors and counted, so
    that a silent output, which gets the floors, can never score below it."""
    reversed_clean = speech_like(SECONDS, seed=0)[::-1].copy()
    save_audio(str(corpus["sysA"] / "a.wav"), reversed_clean, SR, "FLOAT")
    output = tmp_path / "results"
    assert main(base_args(corpus, output, "sysA") + ["--metrics", "estoi,sisdr"]) == 0
    row = next(r for r in read_rows(output) if r["file"] == "a.wav")
    assert (float(row["estoi"]), float(row["sisdr"]), row["floored"]) == (0.0, -50.0, "estoi sisdr")
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sysA"]["estoi"]["floored"] == summary["sysA"]["sisdr"]["floored"] == 1
    assert not any("set to the floor" in m for m in caplog.messages)  # computed, not undefined


def test_reference_too_short_for_estoi_is_not_averaged_in(corpus, tmp_path):
    """pystoi returns 1e-5 (with a warning) when the reference has under 30 frames of speech;
    that value must not enter any mean."""
    for name in ("clean", "sysA"):
        audio = sf.read(str(corpus[name] / "a.wav"), dtype="float32")[0]
        save_audio(str(corpus[name] / "a.wav"), audio[: SR // 2], SR)
    output = tmp_path / "results"
    assert main(base_args(corpus, output, "sysA") + ["--metrics", "estoi,sisdr"]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sysA"]["estoi"]["n"] == 1 and summary["sysA"]["sisdr"]["n"] == 2
    row = next(r for r in read_rows(output) if r["file"] == "a.wav")
    assert row["estoi"] == "nan" and row["not_scored"] == "estoi"


def test_intrusive_metric_without_clean_is_an_error(corpus, tmp_path, capsys):
    argv = ["--system", f"sysA={corpus['sysA']}", "--metrics", "pesq"]
    argv += ["--output-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "--clean" in capsys.readouterr().err


def test_reserved_or_repeated_system_names_are_refused(corpus, tmp_path, capsys):
    assert main(base_args(corpus, tmp_path / "r", "sysA", "sysA")) == 2
    assert main(base_args(corpus, tmp_path / "r") + ["--system", f"clean={corpus['sysA']}"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["error: system name(s) used twice or reserved: sysA",
                      "error: system name(s) used twice or reserved: clean"]


def test_counts_below_their_minimum_are_one_line_naming_the_flag(corpus, tmp_path, capsys):
    assert main(base_args(corpus, tmp_path / "r", "sysA") + ["--workers", "0"]) == 2
    assert main(base_args(corpus, tmp_path / "r", "sysA") + ["--num-plot-files", "-1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["error: --workers must be a finite number >= 1, got 0",
                      "error: --num-plot-files must be a finite number >= 0, got -1"]
    assert not (tmp_path / "r").exists()


def test_input_errors_are_one_line_with_exit_2_and_debug_shows_the_traceback(corpus, tmp_path, capsys):
    argv = ["--clean", str(tmp_path / "no_such_folder"), "--system", f"sysA={corpus['sysA']}",
            "--output-dir", str(tmp_path / "r"), "--workers", "1"]
    assert main(argv) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no_such_folder" in errors[0]
    with pytest.raises(UsageError, match="no_such_folder"):
        main(argv + ["--debug"])


def test_unusable_output_folder_is_one_line_before_any_scoring(corpus, tmp_path, capsys, monkeypatch):
    """An output folder below a file cannot be created: one line naming it, exit 2, and no file
    scored first (scoring would fail this test)."""

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the output folder was checked")

    monkeypatch.setattr(evaluation_run, "score_all", no_scoring)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output = blocker / "out"
    assert main(base_args(corpus, output, "sysA") + ["--metrics", "sisdr"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {output}: cannot create the output folder")


@pytest.mark.slow
def test_workers_without_nisqa_start_without_torch_setup(corpus, tmp_path, monkeypatch):
    """Without NISQA no metric needs torch: the worker pool gets no initializer."""
    pools = []

    class RecordingPool(scoring.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(scoring, "ProcessPoolExecutor", RecordingPool)
    output = tmp_path / "results"
    assert main(base_args(corpus, output, "sysA") + ["--metrics", "sisdr", "--workers", "2"]) == 0
    assert pools == [{"max_workers": 2}]
    assert len(read_rows(output)) == len(FILES)


def test_default_metrics_depend_on_clean_reference():
    # lsd is scored on request only (ON_REQUEST): most corpora have no band above 8 kHz.
    assert resolve_metrics(None, has_clean=True) == tuple(m for m in ALL_METRICS if m != "lsd")
    assert resolve_metrics(None, has_clean=False) == ("dnsmos", "nisqa")


def test_metric_whose_backend_is_missing_is_skipped_or_refused(monkeypatch):
    monkeypatch.setitem(METRIC_BACKENDS, "pesq", ("no_such_module_for_diffiner_tests",))
    assert resolve_metrics(None, has_clean=True) == ("estoi", "sisdr", "dnsmos", "nisqa")
    with pytest.raises(EvaluationError, match="no_such_module_for_diffiner_tests"):
        resolve_metrics(["pesq", "sisdr"], has_clean=True)


def test_default_plot_files_are_largest_ovrl_gain_and_loss_of_last_over_first_system():
    changes = {"f1": 0.5, "f2": -1.0, "f3": 1.2, "f4": 0.1}
    rows = []
    for file, change in changes.items():
        rows.append({"file": file, "system": "noisy", "dnsmos_ovrl": 5.0})
        rows.append({"file": file, "system": "sysA", "dnsmos_ovrl": 2.0})
        rows.append({"file": file, "system": "sysB", "dnsmos_ovrl": 2.0 + change})
    setup = EvaluationSetup(systems={"sysA": "a", "sysB": "b"}, noisy="n", num_plot_files=2)
    assert choose_plot_files(rows, sorted(changes), setup) == ["f3", "f2"]
    setup = EvaluationSetup(systems={"sysA": "a", "sysB": "b"}, noisy="n", num_plot_files=3)
    assert choose_plot_files(rows, sorted(changes), setup) == ["f3", "f2", "f1"]


def test_default_plot_files_without_dnsmos_are_the_first_files():
    rows = [{"file": f, "system": "sysA", "sisdr": 1.0} for f in ("f1", "f2", "f3")]
    setup = EvaluationSetup(systems={"sysA": "a"}, num_plot_files=2)
    assert choose_plot_files(rows, ["f1", "f2", "f3"], setup) == ["f1", "f2"]


def test_lsd_measures_the_band_above_8_khz_at_the_clean_files_rate(tmp_path):
    """A 48 kHz corpus: the system that kept the high band scores a far lower LSD than the one
    written at 16 kHz; a 16 kHz clean file is not scored for LSD, with a reason."""
    from scipy import signal

    rate = 48000
    rng = np.random.default_rng(7)
    sos = signal.butter(6, (9000, 20000), btype="bandpass", fs=rate, output="sos")
    speech = speech_like(SECONDS, rate, seed=1)
    clean = speech + 0.05 * signal.sosfilt(sos, rng.standard_normal(speech.size)).astype(np.float32)
    for folder, audio, at in (("clean", clean, rate), ("kept", 0.9 * clean, rate),
                              ("narrow", resample(clean, rate, SR), SR)):
        save_audio(str(tmp_path / folder / "a.wav"), audio, at, "FLOAT")
        save_audio(str(tmp_path / folder / "b.wav"), resample(clean, rate, SR), SR, "FLOAT")
    output = tmp_path / "results"
    argv = ["--clean", str(tmp_path / "clean"), "--output-dir", str(output), "--workers", "1", "--metrics", "lsd",
            "--system", f"kept={tmp_path / 'kept'}", "--system", f"narrow={tmp_path / 'narrow'}"]
    assert main(argv) == 0
    rows = {(r["file"], r["system"]): r for r in read_rows(output)}
    assert float(rows[("a.wav", "kept")]["lsd"]) < 0.2 < 2.0 < float(rows[("a.wav", "narrow")]["lsd"])
    assert rows[("b.wav", "kept")]["not_scored"] == "lsd"
    assert "the file's rate, mono" in (output / "report.html").read_text()


def test_nisqa_gets_the_file_at_its_own_rate_and_the_wide_band_metrics_16_khz(monkeypatch, tmp_path):
    from diffiner.evaluation import nisqa, scoring

    seen = {}
    monkeypatch.setattr(nisqa, "scores", lambda signal, rate: seen.update(nisqa=(signal.size, rate)) or
                        dict.fromkeys(nisqa.COLUMNS, 3.0))
    monkeypatch.setattr(scoring.metrics, "dnsmos", lambda signal: seen.update(dnsmos=signal.size) or
                        {"SIG": 3.0, "BAK": 3.0, "OVRL": 3.0, "P808": 3.0})
    path = str(tmp_path / "a.wav")
    save_audio(path, resample(speech_like(SECONDS, seed=2), SR, 44100), 44100, "FLOAT")
    signal, _ = scoring.read_signal(path)
    scoring.score_signal(signal, None, ["dnsmos", "nisqa"])
    assert seen == {"nisqa": (signal.native.size, 44100), "dnsmos": signal.at_16k.size}
    assert signal.at_16k.size == round(signal.native.size * SR / 44100)
