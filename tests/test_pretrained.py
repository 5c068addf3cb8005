"""The published weights by name (diffiner.pretrained, over diffiner.download), against a local
web server.

A file of the published size (164 M parameters, 657 MB) is too big to serve in a test: the layout
check takes its expectation from one constant, PUBLISHED_LAYOUT, so these tests serve the tiny
model with that constant patched to the tiny layout; a separate test shows that the real constant
is the layout of the network built from the published settings.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from diffiner import Refiner, pretrained
from diffiner.commands import pretrained as pretrained_command
from diffiner.commands.refine import main as refine_main
from diffiner.download import DownloadError
from diffiner.pretrained import FILE_NAME, PUBLISHED_LAYOUT, Layout, layout_of
from diffiner.script_util import create_model_and_diffusion, model_and_diffusion_defaults

from conftest import TINY, write_wav
from web_server import TRUNCATED, closed_port_url, serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(ROOT, "demo", "model", "diffiner_demo.pt")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """An empty cache folder of the test's own, and a download address where nothing answers."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(folder))
    monkeypatch.setenv(pretrained.URL_ENV, closed_port_url() + "/" + FILE_NAME)
    return folder


@pytest.fixture
def tiny_published(tiny_checkpoint, monkeypatch):
    """The tiny checkpoint, with the published layout patched to be its own."""
    monkeypatch.setattr(pretrained, "PUBLISHED_LAYOUT", layout_of(torch.load(tiny_checkpoint)))
    return tiny_checkpoint


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A served folder; the download address points at FILE_NAME in it. Yields (folder, base URL)."""
    folder = tmp_path / "site"
    folder.mkdir()
    with serving(str(folder)) as url:
        monkeypatch.setenv(pretrained.URL_ENV, f"{url}/{FILE_NAME}")
        yield folder, url


def refused(cache_folder, message: str) -> str:
    """Assert the cache holds nothing and `message` is one line that says where to put the file."""
    assert os.listdir(cache_folder) == [], "a refused download left something in the cache"
    assert "\n" not in message and f"put it at {cache_folder / FILE_NAME}" in message
    return message


def test_the_published_layout_is_that_of_the_network_the_published_settings_build():
    """The constant is the architecture's, not typed in: the published-size UNet built on the meta
    device (no memory for its 164 M parameters) has exactly that many tensors and values."""
    if not hasattr(torch.device("meta"), "__enter__"):
        pytest.skip("torch < 2.0 cannot build a module on the meta device")
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**model_and_diffusion_defaults())
    assert layout_of(model.state_dict()) == PUBLISHED_LAYOUT == Layout(612, 164_303_618)


def test_a_good_file_is_downloaded_checked_and_cached(cache, site, tiny_published, monkeypatch, capsys):
    folder, _ = site
    shutil.copy(tiny_published, folder / FILE_NAME)
    path = pretrained.resolve("published")
    assert path == str(cache / FILE_NAME) and os.listdir(cache) == [FILE_NAME]
    assert open(path, "rb").read() == open(tiny_published, "rb").read()
    assert FILE_NAME in capsys.readouterr().err  # the progress bar
    # Later uses take the cached copy: nothing is downloaded again.
    monkeypatch.setenv(pretrained.URL_ENV, closed_port_url() + "/" + FILE_NAME)
    assert pretrained.resolve("published", progress=False) == path


def test_an_error_page_is_refused_and_not_kept(cache, site, tiny_published):
    folder, _ = site
    (folder / FILE_NAME).write_text("<!DOCTYPE html><html><body>Too many requests</body></html>")
    with pytest.raises(DownloadError) as caught:
        pretrained.resolve("published", progress=False)
    message = refused(cache, str(caught.value))
    assert "refused, nothing kept: not a PyTorch checkpoint (it holds text)" in message
    assert ".tmp-" not in message  # the temporary copy, gone, is not named


def test_a_truncated_download_is_refused_and_not_kept(cache, site, tiny_published, monkeypatch):
    folder, url = site
    shutil.copy(tiny_published, folder / FILE_NAME)
    size = os.path.getsize(tiny_published)
    monkeypatch.setenv(pretrained.URL_ENV, f"{url}{TRUNCATED}{FILE_NAME}")  # Content-Length larger than sent
    with pytest.raises(DownloadError) as caught:
        pretrained.resolve("published", progress=False)
    assert f"the download is truncated ({size // 2} of {size} bytes)" in refused(cache, str(caught.value))
    # Cut short without a length to tell (a server that announces none): the check sees the cut.
    (folder / FILE_NAME).write_bytes(open(tiny_published, "rb").read()[:size // 2])
    monkeypatch.setenv(pretrained.URL_ENV, f"{url}/{FILE_NAME}")
    with pytest.raises(DownloadError) as caught:
        pretrained.resolve("published", progress=False)
    assert "the checkpoint is truncated" in refused(cache, str(caught.value))


def test_another_model_is_refused_by_its_layout(cache, site):
    """The demo model renamed as the published weights, with the real published layout."""
    folder, _ = site
    shutil.copy(DEMO_MODEL, folder / FILE_NAME)
    with pytest.raises(DownloadError) as caught:
        pretrained.resolve("published", progress=False)
    assert ("not the published weights: 204 tensors and 1,313,666 parameters, the published file has 612 tensors "
            "and 164,303,618 parameters") in refused(cache, str(caught.value))


def test_an_http_error_is_one_line(cache, site):
    with pytest.raises(DownloadError) as caught:
        pretrained.resolve("published", progress=False)  # nothing served at that name
    assert "HTTP error 404" in refused(cache, str(caught.value))


def test_offline_says_where_to_put_the_file(cache):
    with pytest.raises(DownloadError) as caught:
        pretrained.resolve("published", progress=False)
    message = str(caught.value)
    assert caught.value.offline and "offline or unreachable" in message
    assert message.endswith(f"download {FILE_NAME} elsewhere and put it at {cache / FILE_NAME}")
    refused(cache, message)


def test_refine_offline_is_one_line_and_writes_nothing(tmp_path, cache, capsys):
    write_wav(str(tmp_path / "noisy.wav"), torch.zeros(1600).numpy(), 16000)
    write_wav(str(tmp_path / "enhanced.wav"), torch.zeros(1600).numpy(), 16000)
    code = refine_main(["--root-noisy", str(tmp_path / "noisy.wav"), "--root-proc", str(tmp_path / "enhanced.wav"),
                        "--model-path", "published", "--no-progress"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 1 and len(errors) == 1 and f"put it at {cache / FILE_NAME}" in errors[0]
    assert sorted(os.listdir(tmp_path)) == ["cache", "enhanced.wav", "noisy.wav"]


def test_a_plain_path_is_used_as_it_is(tiny_checkpoint, cache):
    assert pretrained.resolve(tiny_checkpoint) == tiny_checkpoint
    assert not cache.exists()


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(pretrained.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.published_path() == str(tmp_path / "xdg" / "diffiner" / FILE_NAME)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pretrained.published_path() == str(tmp_path / "home" / ".cache" / "diffiner" / FILE_NAME)
    monkeypatch.delenv(pretrained.URL_ENV)
    assert pretrained.published_url() == pretrained.URL


def carried_tiny_in_cache(cache, carried_tiny_checkpoint) -> None:
    """The cache holding the tiny model as the published weights, with its settings beside it."""
    cache.mkdir()
    shutil.copy(carried_tiny_checkpoint, cache / FILE_NAME)
    shutil.copy(os.path.join(os.path.dirname(carried_tiny_checkpoint), "model_config.yml"), cache)


def test_refiner_from_pretrained_takes_the_cached_copy(cache, carried_tiny_checkpoint):
    carried_tiny_in_cache(cache, carried_tiny_checkpoint)
    refiner = Refiner.from_pretrained("published", device="cpu", timestep_respacing="ddim2")
    assert refiner.model.model_channels == TINY["num_channels"]
    with pytest.raises(ValueError, match="no published weights named 'vb'"):
        Refiner.from_pretrained("vb")


@pytest.mark.slow  # builds a Refiner and refines a file with the tiny model
def test_refine_with_model_path_published(tmp_path, cache, carried_tiny_checkpoint):
    carried_tiny_in_cache(cache, carried_tiny_checkpoint)
    write_wav(str(tmp_path / "noisy.wav"), torch.randn(4800, generator=torch.Generator().manual_seed(0)).numpy() * 0.1,
              16000)
    shutil.copy(tmp_path / "noisy.wav", tmp_path / "enhanced.wav")
    code = refine_main(["--root-noisy", str(tmp_path / "noisy.wav"), "--root-proc", str(tmp_path / "enhanced.wav"),
                        "--model-path", "published", "--timestep-respacing", "ddim2", "--no-progress",
                        "--output-dir", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "enhanced.wav").is_file()
    config = yaml.safe_load((tmp_path / "out" / "config.yml").read_text())
    assert config["model_path"] == str(cache / FILE_NAME)


def test_the_command_prints_the_checked_path_or_refuses_in_one_line(tmp_path, cache, tiny_published, capsys):
    # --url takes a local file too: checked and copied into the cache.
    assert pretrained_command.main(["--url", tiny_published, "--no-progress"]) == 0
    assert capsys.readouterr().out == f"{cache / FILE_NAME}\n"
    assert pretrained_command.main([tiny_published]) == 0
    assert capsys.readouterr().out == f"{tiny_published}\n"
    other = torch.load(tiny_published)
    other.popitem()  # one tensor fewer
    torch.save(other, tmp_path / "other.pt")
    for path, problem in [(str(tmp_path / "other.pt"), "not the published weights"),
                          (str(tmp_path / "missing.pt"), "No such file")]:
        assert pretrained_command.main([path]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1
        assert path in captured.err and problem in captured.err
    # A wrong file put into the cache by hand: refused, with the way out.
    (cache / FILE_NAME).write_text("<html>saved by hand</html>")
    assert pretrained_command.main([]) == 2
    assert "delete it to download the published weights again" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess that imports torch
def test_the_command_runs_as_a_module(cache):
    """run_example.sh's call: `python -m diffiner.commands.pretrained FILE`."""
    done = subprocess.run([sys.executable, "-m", "diffiner.commands.pretrained", DEMO_MODEL],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "not the published weights" in done.stderr
