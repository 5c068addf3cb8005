"""Tests of NISQA in the evaluation (diffiner.evaluation.nisqa) with a randomly initialised network.

The published weights are CC BY-NC-SA and not shipped, and nothing here may download them: each
test builds a NISQA network with the published configuration's shapes, seeded random weights,
saved in torchmetrics' nisqa.tar format. So these tests check the plumbing (loading, checking,
scoring, columns, windows, caching, downloading), not the scores of the real model.
"""

import csv
import io
import json
import logging
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from diffiner.audio.io import save_audio
from diffiner.commands.evaluate import main
from diffiner.evaluation import nisqa, scoring
from diffiner.evaluation.metrics import MetricError, UnscorableFile
from diffiner.seeding import seed_globals

from conftest import speech_like, with_noise
from web_server import serving

tm_nisqa = pytest.importorskip("torchmetrics.functional.audio.nisqa")

SR = 16000
FILES = ("a.wav", os.path.join("sub", "b.wav"))

# NISQA v2.0's published configuration (gabrielmittag/NISQA, config/train_nisqa_cnn_sa_ap.yaml):
# the settings torchmetrics reads from a checkpoint's "args".
NISQA_ARGS = dict(
    ms_n_fft=4096, ms_hop_length=0.01, ms_win_length=0.02, ms_n_mels=48, ms_fmax=20000,
    ms_seg_length=15, ms_seg_hop_length=4, ms_max_segments=1300,
    cnn_c_out_1=16, cnn_c_out_2=32, cnn_c_out_3=64, cnn_kernel_size=(3, 3), cnn_dropout=0.2,
    cnn_pool_1=[24, 7], cnn_pool_2=[12, 5], cnn_pool_3=[6, 3],
    td_sa_d_model=64, td_sa_nhead=1, td_sa_num_layers=2, td_sa_h=64, td_sa_dropout=0.1,
    pool_att_h=128, pool_att_dropout=0,
)
PUBLISHED_PARAMETERS = 252_458


def random_nisqa_model(seed: int = 0) -> torch.nn.Module:
    """torchmetrics' NISQA network with seeded random weights."""
    seed_globals(seed)  # layer initialisation draws from torch's global generator
    model = tm_nisqa._NISQADIM(NISQA_ARGS)
    for head in model.pool_layers:
        # torchmetrics deep-copies one pooling head five times: without a fresh initialisation
        # of each, the five outputs would be equal and a mixed-up column order would go unseen.
        for layer in head.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
        with torch.no_grad():  # centre the outputs mid-scale, well above the floor of 1
            head.model.linear3.bias += 3.0
    return model


def save_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """Save in torchmetrics' nisqa.tar format: {"args", "model_state_dict"}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"args": NISQA_ARGS, "model_state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "nisqa.tar", random_nisqa_model())


@pytest.fixture(autouse=True)
def fresh_state(tmp_path, monkeypatch):
    """An empty home (torchmetrics' cache ~/.torchmetrics holds nothing), no download possible
    (port 9 refuses connections), and no NISQA model loaded before or after the test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(nisqa, "WEIGHTS_URL", "http://127.0.0.1:9/nisqa.tar")
    nisqa._loaded = None
    tm_nisqa._load_nisqa_model.cache_clear()
    yield
    nisqa._loaded = None
    tm_nisqa._load_nisqa_model.cache_clear()


@pytest.fixture
def corpus(tmp_path: Path) -> Dict[str, Path]:
    """clean/, noisy/ (0 dB) and enhanced/ (20 dB SNR), 1.2 s files."""
    folders = {name: tmp_path / name for name in ("clean", "noisy", "enhanced")}
    for index, relative in enumerate(FILES):
        clean = speech_like(1.2, seed=index)
        save_audio(str(folders["clean"] / relative), clean, SR)
        save_audio(str(folders["noisy"] / relative), with_noise(clean, 0.0, seed=10 + index), SR)
        save_audio(str(folders["enhanced"] / relative), with_noise(clean, 20.0, seed=20 + index), SR)
    return folders


def run(corpus: Dict[str, Path], output: Path, *extra: str) -> int:
    return main(["--clean", str(corpus["clean"]), "--noisy", str(corpus["noisy"]),
                 "--system", f"enhanced={corpus['enhanced']}", "--output-dir", str(output), *extra])


def read_rows(output: Path) -> List[Dict[str, str]]:
    with open(output / "per_file.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_random_network_has_the_published_shapes_and_distinct_outputs(weights):
    model = random_nisqa_model()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS
    nisqa.load_weights(str(weights))
    scores = nisqa.scores(speech_like(1.2), SR)
    assert list(scores) == list(nisqa.COLUMNS)
    assert len(set(scores.values())) == 5


def test_scores_are_deterministic_and_in_the_papers_order(weights):
    nisqa.load_weights(str(weights))
    signal = with_noise(speech_like(1.2), 10.0)
    first, second = nisqa.scores(signal, SR), nisqa.scores(signal, SR)
    assert first == second
    # torchmetrics returns MOS, NOI, DIS, COL, LOUD; the columns are MOS, NOI, COL, DIS, LOUD.
    raw = tm_nisqa.non_intrusive_speech_quality_assessment(torch.from_numpy(signal), SR).tolist()
    assert [first[c] for c in nisqa.COLUMNS] == pytest.approx([raw[0], raw[1], raw[3], raw[2], raw[4]], abs=1e-6)


@pytest.mark.filterwarnings("ignore:n_fft=4096 is too large")  # librosa, on inputs under 0.26 s
def test_length_limits_are_torchmetrics_own(tmp_path):
    """Shorter than the shortest input, a file is unscorable; longer than the longest, which
    torchmetrics refuses, it is scored in equal parts whose scores are averaged by length. The
    limits come from the checkpoint's settings: with the published ones 0.14 s and 52.1 s; a
    checkpoint allowing 50 segments (2.1 s) keeps this test fast."""
    assert nisqa._length_limits(NISQA_ARGS, SR) == (2240, 834_239)
    short_args = dict(NISQA_ARGS, ms_max_segments=50)
    path = tmp_path / "short" / "nisqa.tar"
    path.parent.mkdir()
    torch.save({"args": short_args, "model_state_dict": random_nisqa_model().state_dict()}, path)
    nisqa.load_weights(str(path))
    shortest, longest = nisqa._length_limits(short_args, SR)
    assert (shortest, longest) == (2240, 34_239)

    noise = 0.1 * np.random.default_rng(0).standard_normal(2 * longest + 2).astype(np.float32)
    score = tm_nisqa.non_intrusive_speech_quality_assessment
    with pytest.raises(RuntimeError, match="too short"):
        score(torch.from_numpy(noise[: shortest - 1]), SR)
    with pytest.raises(RuntimeError, match="Maximum number"):
        score(torch.from_numpy(noise[: longest + 1]), SR)
    with pytest.raises(UnscorableFile, match="shorter"):
        nisqa.scores(noise[: shortest - 1], SR)
    assert nisqa.scores(noise[:shortest], SR)["nisqa_mos"] > 1.0
    whole = score(torch.from_numpy(noise[:longest]), SR).numpy()
    assert list(nisqa.scores(noise[:longest], SR).values()) == pytest.approx(whole[[0, 1, 3, 2, 4]].tolist(), abs=1e-6)

    parts = np.array_split(noise, 3)  # 2 * longest + 2 samples: three parts within the limit
    expected = sum(p.size * score(torch.from_numpy(p), SR).numpy().astype(np.float64) for p in parts) / noise.size
    assert list(nisqa.scores(noise, SR).values()) == pytest.approx(expected[[0, 1, 3, 2, 4]].tolist(), abs=1e-6)


def test_silence_is_the_outputs_failure(weights):
    nisqa.load_weights(str(weights))
    with pytest.raises(MetricError) as raised:
        nisqa.scores(np.zeros(SR, np.float32), SR)
    assert not isinstance(raised.value, UnscorableFile)


@pytest.mark.slow  # scores with a pool of two worker processes
def test_evaluation_reports_nisqa_per_file_and_in_the_summary(corpus, tmp_path, weights):
    """NISQA runs in worker processes and in-process alike, gives the same values both ways and
    on a rerun, and loads the model once per process."""
    output = tmp_path / "results"
    assert run(corpus, output, "--metrics", "sisdr,nisqa", "--nisqa-weights", str(weights), "--workers", "1") == 0
    assert tm_nisqa._load_nisqa_model.cache_info().misses == 1  # 4 signals, one load
    rows = read_rows(output)
    assert list(rows[0]) == ["file", "system", "sisdr", *nisqa.COLUMNS, "floored", "not_scored", "failed"]
    assert len(rows) == 2 * len(FILES)
    for row in rows:
        assert all(1.0 < float(row[c]) < 5.0 for c in nisqa.COLUMNS) and row["floored"] == ""
    summary = json.loads((output / "summary.json").read_text())
    for system in ("noisy", "enhanced"):
        values = [float(r["nisqa_mos"]) for r in rows if r["system"] == system]
        assert summary[system]["nisqa_mos"]["n"] == len(FILES)
        assert summary[system]["nisqa_mos"]["mean"] == pytest.approx(np.mean(values))
    assert "nisqa_loud" in (output / "summary.md").read_text()

    again = tmp_path / "again"
    assert run(corpus, again, "--metrics", "sisdr,nisqa", "--nisqa-weights", str(weights), "--workers", "2") == 0
    assert (again / "per_file.csv").read_text() == (output / "per_file.csv").read_text()


@pytest.mark.slow  # spawns worker processes, each importing torch afresh
def test_workers_load_the_weights_once_as_they_start(corpus, tmp_path, weights, monkeypatch):
    """Each worker loads the weights in its initializer, not per file: spawned workers, which
    inherit no loaded model, score exactly as the in-process run does."""
    pools = []

    class SpawningPool(scoring.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs)
            super().__init__(*args, mp_context=multiprocessing.get_context("spawn"), **kwargs)

    monkeypatch.setattr(scoring, "ProcessPoolExecutor", SpawningPool)
    in_process, spawned = tmp_path / "in_process", tmp_path / "spawned"
    assert run(corpus, in_process, "--metrics", "nisqa", "--nisqa-weights", str(weights), "--workers", "1") == 0
    assert run(corpus, spawned, "--metrics", "nisqa", "--nisqa-weights", str(weights), "--workers", "2") == 0
    assert pools == [{"max_workers": 2, "initializer": scoring._start_worker, "initargs": (str(weights),)}]
    assert (spawned / "per_file.csv").read_text() == (in_process / "per_file.csv").read_text()


def test_scoring_a_file_uses_the_weights_already_loaded(corpus, weights, monkeypatch):
    """score_file never loads the weights itself: the process (worker or parent) holds them."""
    nisqa.load_weights(str(weights))

    def no_load(path):
        raise AssertionError("weights loaded per file")

    monkeypatch.setattr(nisqa, "load_weights", no_load)
    task = scoring.FileTask(FILES[0], None, (("enhanced", str(corpus["enhanced"])),), ("nisqa",))
    [row] = scoring.score_file(task)
    assert all(1.0 < row[c] < 5.0 for c in nisqa.COLUMNS) and row["floored"] == []


def test_default_metrics_take_nisqa_from_torchmetrics_cache(corpus, tmp_path, weights):
    cached = Path(nisqa.cache_path())
    cached.parent.mkdir(parents=True)
    shutil.copy(weights, cached)
    assert str(cached).startswith(os.environ["HOME"])
    output = tmp_path / "results"
    argv = ["--system", f"enhanced={corpus['enhanced']}", "--output-dir", str(output), "--workers", "1"]
    assert main(argv) == 0
    assert list(read_rows(output)[0])[2:] == ["dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808",
                                              *nisqa.COLUMNS, "floored", "not_scored", "failed"]


def test_offline_without_weights_leaves_nisqa_out_with_one_line(corpus, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    output = tmp_path / "results"
    assert run(corpus, output, "--metrics", "sisdr,nisqa", "--workers", "1") == 0
    assert list(read_rows(output)[0]) == ["file", "system", "sisdr", "floored", "not_scored", "failed"]
    lines = [r.getMessage() for r in caplog.records if "nisqa" in r.getMessage().lower()]
    assert len(lines) == 1 and lines[0].startswith("nisqa left out") and "--nisqa-weights" in lines[0]
    cache_dir = os.path.dirname(nisqa.cache_path())
    assert not os.path.exists(cache_dir) or not os.listdir(cache_dir)  # nothing written
    assert tm_nisqa.NISQA_DIR == nisqa.CACHE_DIR  # torchmetrics' own setting is left as it was


def test_only_nisqa_without_weights_is_an_error(corpus, tmp_path, capsys):
    assert run(corpus, tmp_path / "r", "--metrics", "nisqa") == 2
    assert "no metric left" in capsys.readouterr().err


@pytest.fixture
def server(tmp_path):
    """A local web server over tmp_path/site; yields the folder and its base URL."""
    site = tmp_path / "site"
    site.mkdir()
    with serving(str(site)) as url:
        yield site, url


def test_download_is_checked_before_it_enters_the_cache(server, weights, monkeypatch):
    site, url = server
    cache = Path(nisqa.cache_path())
    (site / "error.html").write_text("<html>rate limited</html>")
    for name in ("missing.tar", "error.html"):  # an HTTP error; an error page served as the file
        monkeypatch.setattr(nisqa, "WEIGHTS_URL", f"{url}/{name}")
        assert nisqa.find_weights(None, download=True) is None
        assert not cache.exists() and not list(cache.parent.glob("*"))
    assert nisqa.find_weights(None, download=False) is None

    shutil.copy(weights, site / "nisqa.tar")
    monkeypatch.setattr(nisqa, "WEIGHTS_URL", f"{url}/nisqa.tar")
    assert nisqa.find_weights(None, download=True) == str(cache)
    assert cache.read_bytes() == weights.read_bytes() and os.listdir(cache.parent) == ["nisqa.tar"]
    assert nisqa.scores(speech_like(1.2), SR)["nisqa_mos"] > 1.0


@pytest.mark.parametrize("content", ["garbage", "html", "truncated", "wrong_shapes", "empty", "legacy-cut"])
def test_corrupt_weights_are_one_clear_error_naming_the_file(corpus, tmp_path, weights, capsys, content):
    bad = tmp_path / "bad" / "nisqa.tar"
    bad.parent.mkdir()
    if content == "garbage":
        bad.write_bytes(bytes(range(256)) * 4)
    elif content == "html":
        bad.write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    elif content == "truncated":
        bad.write_bytes(weights.read_bytes()[:50_000])
    elif content == "empty":  # was an IndexError that named no file
        bad.write_bytes(b"")
    elif content == "legacy-cut":  # torch's EOFError without a message: also an IndexError before
        legacy = io.BytesIO()
        torch.save({"args": NISQA_ARGS}, legacy, _use_new_zipfile_serialization=False)
        bad.write_bytes(legacy.getvalue()[:10])
    else:
        state = random_nisqa_model().state_dict()
        state.pop("cnn.model.conv1.weight")
        torch.save({"args": NISQA_ARGS, "model_state_dict": state}, bad)
    output = tmp_path / "results"
    assert run(corpus, output, "--metrics", "sisdr,nisqa", "--nisqa-weights", str(bad), "--workers", "1") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and str(bad) in errors[0] and "not a NISQA checkpoint" in errors[0]
    assert not output.exists()


def test_corrupt_cache_is_an_error_that_says_how_to_recover(corpus, tmp_path, capsys):
    cached = Path(nisqa.cache_path())
    cached.parent.mkdir(parents=True)
    cached.write_text("<html>an error page saved by an earlier download</html>")
    assert run(corpus, tmp_path / "r", "--metrics", "nisqa") == 2
    error = capsys.readouterr().err
    assert str(cached) in error and "delete it" in error


def test_weights_flag_errors_are_usage_errors(corpus, tmp_path, weights, capsys):
    missing = tmp_path / "nowhere" / "nisqa.tar"
    renamed = tmp_path / "weights.tar"
    shutil.copy(weights, renamed)
    assert run(corpus, tmp_path / "r", "--nisqa-weights", str(missing)) == 2
    assert run(corpus, tmp_path / "r", "--nisqa-weights", str(renamed)) == 2
    assert run(corpus, tmp_path / "r", "--metrics", "sisdr", "--nisqa-weights", str(weights)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert str(missing) in errors[0] and "no such file" in errors[0]
    assert str(renamed) in errors[1] and "named nisqa.tar" in errors[1]
    assert "nisqa is not among the metrics" in errors[2]


def test_help_describes_the_nisqa_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--nisqa-weights FILE" in text and "nisqa.tar" in text and "CC BY-NC-SA" in text
    assert "nisqa" in text.split("--metrics LIST")[1].split("--nisqa-weights")[0]
