"""Tests of the listening page (diffiner.evaluation.listening_page): what diffiner-evaluate writes
into report.html and beside it, and, in headless Chromium, that the page runs without errors,
sorts, pages, switches systems at the same position and opens a whole test set quickly."""

import base64
import contextlib
import html.parser
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile as sf

from diffiner.audio.io import save_audio
from diffiner.commands.evaluate import main
from diffiner.evaluation.listening_page import PageData, RowImages, render_page
from diffiner.evaluation.plots import IMAGE_ROWS, SPECTROGRAM_RANGE_DB, write_row_images
from diffiner.evaluation.report import floored_files, summarize

from conftest import snr_folders, speech_like, write_wav

SR = 16000
SECONDS = 2.4
# Names a page must escape and links must percent-encode.
FILES = ("a.wav", "d.wav", os.path.join("sub", "b c#1.wav"))  # in the evaluation's (sorted) order
SNRS = {"noisy": 0.0, "sysA": 10.0, "sys<B>&": 25.0}
SOURCES = ("clean", *SNRS)
METRICS = ["sisdr", "estoi"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium); not found")


# ----- the evaluation whose page is tested -----

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, Path]:
    """clean/ plus noisy/ (0 dB), sysA/ (10 dB) and 'sys<B>&'/ (25 dB SNR), each with FILES."""
    return snr_folders(tmp_path_factory.mktemp("corpus"), FILES, SNRS, SECONDS, SR)


def evaluate_args(corpus: Dict[str, Path], output: Path) -> List[str]:
    args = ["--clean", str(corpus["clean"]), "--noisy", str(corpus["noisy"]), "--output-dir", str(output),
            "--workers", "1", "--metrics", ",".join(METRICS)]
    for name in ("sysA", "sys<B>&"):
        args += ["--system", f"{name}={corpus[name]}"]
    return args


@pytest.fixture(scope="module")
def evaluation(corpus, tmp_path_factory) -> Tuple[Path, str]:
    """The output folder of one evaluation and what the command printed."""
    output = tmp_path_factory.mktemp("evaluation") / "out"
    capture = tmp_path_factory.mktemp("stdout") / "printed.txt"
    with open(capture, "w") as stream, contextlib.redirect_stdout(stream):
        assert main(evaluate_args(corpus, output)) == 0
    return output, capture.read_text()


class PageParser(html.parser.HTMLParser):
    """Audio (a player's label and its file's link), images (alt, src), every src/href, and
    script elements."""

    def __init__(self):
        super().__init__()
        self.players: List[Dict[str, str]] = []  # {"label", "href"}
        self.images: List[Dict[str, str]] = []
        self.links: List[str] = []
        self.scripts: List[Dict[str, str]] = []
        self.stylesheets = 0
        self._in_data = False
        self.data = ""

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.links.extend(attributes[key] for key in ("src", "href") if key in attributes)
        if tag == "div" and attributes.get("class") == "player":
            self.players.append({"label": attributes["data-label"]})
        elif tag == "a" and attributes.get("class") == "audio":
            self.players[-1]["href"] = attributes["href"]
        elif tag == "img":
            self.images.append(attributes)
        elif tag == "script":
            self.scripts.append(attributes)
            self._in_data = attributes.get("id") == "page-data"
        elif tag == "link":
            self.stylesheets += 1

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data += data


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def resolve(page: Path, link: str) -> Path:
    """Where a relative link of the page points, resolved the way a browser does: by the URL's
    path, lexically."""
    return Path(os.path.normpath(os.path.join(page.parent, unquote(link))))


# ----- the written page -----

def test_page_has_one_labelled_player_and_image_per_file_and_source(evaluation, corpus):
    output, printed = evaluation
    page = output / "report.html"
    assert f"listening page: {page}" in printed
    parsed = parse_page(page)
    expected = {f"{name}, {relative}" for relative in FILES for name in SOURCES}
    assert len(parsed.players) == len(FILES) * len(SOURCES)
    assert {player["label"] for player in parsed.players} == expected
    assert {image["alt"] for image in parsed.images} == {f"spectrogram of {label}" for label in expected}
    assert all(image["loading"] == "lazy" for image in parsed.images)
    # Each player plays the file it names, where it lies.
    for player in parsed.players:
        name, relative = player["label"].split(", ", 1)
        assert resolve(page, player["href"]) == corpus[name] / relative


def test_every_link_resolves_and_nothing_is_fetched_from_the_network(evaluation):
    output, _ = evaluation
    page = output / "report.html"
    parsed = parse_page(page)
    assert parsed.links and all(not link.startswith(("http:", "https:", "//", "/")) for link in parsed.links)
    missing = [link for link in parsed.links if not resolve(page, link).is_file()]
    assert missing == []
    assert parsed.stylesheets == 0
    assert all("src" not in script for script in parsed.scripts)  # inline scripts only
    assert not list(output.rglob(".tmp-*"))


def test_page_scores_are_the_evaluations(evaluation):
    """The numbers the page sorts by are those in per_file.csv, for every file and system."""
    import csv

    output, _ = evaluation
    data = json.loads(parse_page(output / "report.html").data)
    assert data["sources"] == list(SOURCES) and data["columns"] == ["estoi", "sisdr"] and data["files"] == list(FILES)
    with open(output / "per_file.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(FILES) * len(SNRS)
    for row in rows:
        file_index, source = FILES.index(row["file"]), SOURCES.index(row["system"])
        for column_index, column in enumerate(data["columns"]):
            assert data["scores"][file_index][source][column_index] == pytest.approx(float(row[column]), abs=1e-5)
    assert all(value is None for per_file in data["scores"] for value in per_file[0])  # clean: no scores


def test_spectrograms_of_a_row_share_one_db_scale(tmp_path):
    """A copy 20 dB quieter is drawn 20/80 of the palette darker, not stretched to full scale."""
    from PIL import Image

    loud = speech_like(1.0, seed=3)
    save_audio(str(tmp_path / "loud.wav"), loud, SR, "FLOAT")
    save_audio(str(tmp_path / "quiet.wav"), 0.1 * loud, SR, "FLOAT")
    audio = {name: str(tmp_path / f"{name}.wav") for name in ("loud", "quiet")}
    images = {name: str(tmp_path / "images" / f"{name}.png") for name in audio}
    top, widths = write_row_images(audio, images)
    levels = {name: np.asarray(Image.open(path)) for name, path in images.items()}
    assert levels["loud"].shape == (IMAGE_ROWS, widths["loud"]) and widths["loud"] == widths["quiet"]
    assert levels["loud"].max() == 255
    assert levels["quiet"].max() == pytest.approx(255 * (1 - 20 / SPECTROGRAM_RANGE_DB), abs=1)
    assert math.isfinite(top)


def test_a_clip_shorter_than_one_window_still_gets_its_image(tmp_path):
    save_audio(str(tmp_path / "short.wav"), speech_like(0.01), SR)  # 160 samples, under 512
    image = tmp_path / "short.png"
    _, widths = write_row_images({"short": str(tmp_path / "short.wav")}, {"short": str(image)})
    from PIL import Image

    assert Image.open(image).size == (widths["short"], IMAGE_ROWS)


def test_copied_audio_makes_a_folder_that_can_be_moved(corpus, tmp_path):
    output = tmp_path / "out"
    assert main(evaluate_args(corpus, output) + ["--report-copy-audio"]) == 0
    moved = tmp_path / "elsewhere" / "shared"
    shutil.move(str(output), str(moved))
    page = moved / "report.html"
    parsed = parse_page(page)
    assert all(resolve(page, link).is_file() for link in parsed.links)
    for player in parsed.players:
        name, relative = player["label"].split(", ", 1)
        played = resolve(page, player["href"])
        assert moved in played.parents
        assert played.read_bytes() == (corpus[name] / relative).read_bytes()


def page_data(files: List[str], systems: List[str], root: Path, seed: int = 0) -> PageData:
    """Made-up scores for `files` (held only in memory) and folders under `root`."""
    rng = np.random.default_rng(seed)
    columns = ["pesq", "sisdr"]
    rows = [
        {"file": f, "system": s, "pesq": float(rng.uniform(1, 4.5)), "sisdr": float(rng.uniform(-5, 20)),
         "floored": [], "not_scored": [], "failed": ""}
        for f in files for s in systems
    ]
    summary = summarize(rows, systems, columns)
    sources = {"clean": str(root / "clean"), **{s: str(root / s) for s in systems}}
    return PageData(files, sources, "clean", rows, ["pesq", "sisdr"], columns, summary, floored_files(rows, systems),
                    {})


def test_page_is_built_from_the_data_in_memory(tmp_path):
    """render_page needs no file: names with markup are escaped, links are percent-encoded, the
    scores are the ones given, floored and unscored cells say so."""
    files = ["x <y>.wav", "z#&.wav"]
    data = page_data(files, ["noisy", "a\"b<c>"], tmp_path)
    data.rows[1]["floored"] = ["pesq"]
    data.rows[1]["pesq"] = 1.0
    data.rows[2]["sisdr"] = math.nan
    audio = {(f, s): f"{s}/{f}".replace("#", "%23") for f in files for s in data.sources}
    images = [RowImages(-20.0, {s: (f"img/{i}-{j}.png", 100) for j, s in enumerate(data.sources)})
              for i in range(len(files))]
    formats = dict.fromkeys(data.sources, "16 kHz, mono")
    text = render_page(data, audio, images, formats)
    page = tmp_path / "report.html"
    page.write_text(text, encoding="utf-8")
    parsed = parse_page(page)
    assert {p["label"] for p in parsed.players} == {f"{s}, {f}" for f in files for s in data.sources}
    scores = json.loads(parsed.data)["scores"]
    assert scores[0][2] == pytest.approx([data.rows[1]["pesq"], data.rows[1]["sisdr"]], abs=1e-5)
    assert scores[1][1][1] is None
    assert "1.000 <abbr title=\"set to the metric's floor\">(floor)</abbr>" in text
    assert "colours from -100 dB to -20 dB" in text
    assert "<y>" not in text and "a\"b<c>" not in text


# ----- in the browser -----

class Browser:
    """Headless Chromium driven through the DevTools protocol over a pipe (no network port):
    loads pages, runs script in them, takes screenshots, and records every console message,
    uncaught exception and browser log error of the page."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1800):
        to_browser, self._in = os.pipe()
        self._out, from_browser = os.pipe()
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                   "--remote-debugging-pipe", "--autoplay-policy=no-user-gesture-required", "--mute-audio",
                   "--hide-scrollbars", "about:blank"]
        # The protocol's pipe is the browser's file descriptors 3 (in) and 4 (out).
        shell = f'exec "$@" 3<&{to_browser} 4>&{from_browser}'
        self._log = open(profile.parent / "chromium.log", "wb")
        self.process = subprocess.Popen(["bash", "-c", shell, "bash", *command], pass_fds=(to_browser, from_browser),
                                        stdout=subprocess.DEVNULL, stderr=self._log)
        os.close(to_browser)
        os.close(from_browser)
        self._next_id = 0
        self._buffer = b""
        self.events: List[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        # The window's size includes what headless Chromium keeps for its frame: set the page's own.
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._out], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._out, 1 << 20) if ready else b""
            if not chunk:
                raise TimeoutError("Chromium did not answer in time" if not ready else "Chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, timeout: float = 60.0, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._in, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def open(self, url: str, timeout: float = 60.0) -> None:
        """Load `url` afresh and wait for its load event. Through about:blank, since a step from
        the same page with another fragment would not load it again."""
        for step in ("about:blank", url):
            self.events.clear()
            self.call("Page.navigate", session=True, url=step)
            deadline = time.monotonic() + timeout
            while not any(event.get("method") == "Page.loadEventFired" for event in self.events):
                self.events.append(self._receive(deadline))

    def run(self, expression: str, timeout: float = 60.0):
        """The value of a script expression (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", session=True, timeout=timeout, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> List[str]:
        """Console messages (the page writes none), uncaught exceptions and logged errors."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled":
                found.append(f"console.{params['type']}: {params['args']}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"log: {params['entry']['text']}")
        return found

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10.0)
            self.process.wait(timeout=10)
        except (TimeoutError, RuntimeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._in)
            os.close(self._out)
            self._log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One browser for the module's tests (the tests that use it carry needs_chromium)."""
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    instance = Browser(profile)
    yield instance
    instance.close()


def page_url(page: Path, fragment: str = "") -> str:
    return page.resolve().as_uri() + (f"#{fragment}" if fragment else "")


def ready(browser: Browser) -> Tuple[Optional[str], Optional[str]]:
    """The page's own markers: (ready, error message)."""
    return browser.run("[document.documentElement.getAttribute('data-page-ready'),"
                       " document.documentElement.getAttribute('data-page-error')]")


# The heights of the first shown row's spectrograms, once loaded (they are in view).
FIRST_ROW_IMAGE_HEIGHTS = """new Promise(resolve => {
    const images = Array.from(document.querySelector('section.row:not([hidden])').querySelectorAll('img'));
    const check = () => images.every(i => i.complete) ? resolve(images.map(i => i.naturalHeight))
                                                      : setTimeout(check, 50);
    check(); })"""
# The labels of the page's players once there are COUNT of them: the script makes them as rows
# come near the view.
PLAYER_LABELS = """new Promise((resolve, reject) => {
    const check = () => document.querySelectorAll('audio').length >= COUNT
        ? resolve(Array.from(document.querySelectorAll('audio'), a => a.getAttribute('aria-label')))
        : setTimeout(check, 50);
    check();
    setTimeout(() => reject(new Error('fewer players than COUNT after 10 s')), 10000); })"""
VISIBLE_FILES = "Array.from(document.querySelectorAll('section.row:not([hidden]) .name'), e => e.textContent)"


@pytest.mark.slow
@needs_chromium
def test_chromium_renders_the_page_without_errors(browser, evaluation, tmp_path):
    output, _ = evaluation
    browser.open(page_url(output / "report.html"))
    assert ready(browser) == ["true", None]
    labels = browser.run(PLAYER_LABELS.replace("COUNT", str(len(FILES) * len(SOURCES))))
    assert sorted(labels) == sorted(f"{name}, {relative}" for relative in FILES for name in SOURCES)
    sources = browser.run("Array.from(document.querySelectorAll('audio'), a => a.getAttribute('src'))")
    assert sources == browser.run("Array.from(document.querySelectorAll('a.audio'), a => a.getAttribute('href'))")
    buttons = browser.run("Array.from(document.querySelectorAll('section.row')[0].querySelectorAll('.pick'),"
                          " b => b.textContent)")
    assert buttons == [f"{number} {name}" for number, name in enumerate(SOURCES, 1)]
    assert browser.run(FIRST_ROW_IMAGE_HEIGHTS) == [IMAGE_ROWS] * len(SOURCES)
    screenshot = tmp_path / "report.png"
    browser.screenshot(screenshot)
    from PIL import Image

    image = np.asarray(Image.open(screenshot).convert("RGB"))
    assert image.shape == (1800, 1400, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # text, tables and spectrograms drawn
    assert browser.problems() == []


@pytest.mark.slow
@needs_chromium
def test_broken_script_is_caught(browser, evaluation, tmp_path):
    """The checks above can fail: a page whose script throws is reported by both the page's
    marker and the browser."""
    output, _ = evaluation
    broken = tmp_path / "broken.html"
    broken.write_text((output / "report.html").read_text(encoding="utf-8").replace(
        "var data = JSON.parse", "var data = JSON.parsee"), encoding="utf-8")
    browser.open(page_url(broken))
    state, error = ready(browser)
    assert state is None and "parsee" in error
    assert any("parsee" in problem for problem in browser.problems())


def gains(output: Path, column: str, system: str, baseline: str) -> List[str]:
    """Files ordered by the gain of `system` over `baseline`, largest first, from per_file.csv."""
    import csv

    with open(output / "per_file.csv", newline="") as stream:
        scores = {(r["file"], r["system"]): float(r[column]) for r in csv.DictReader(stream)}
    return sorted(FILES, key=lambda f: scores[(f, baseline)] - scores[(f, system)])


@pytest.mark.slow
@needs_chromium
def test_sorting_by_a_gain_is_kept_in_the_address(browser, evaluation):
    output, _ = evaluation
    page = output / "report.html"
    browser.open(page_url(page))
    assert browser.run(VISIBLE_FILES) == list(FILES)
    choose = """(([id, value]) => { const select = document.getElementById(id); select.value = value;
                  select.dispatchEvent(new Event('change')); })"""
    browser.run(f"{choose}(['sort-minus', '1']), {choose}(['sort-system', '2']), {choose}(['sort-metric', 'sisdr'])")
    expected = gains(output, "sisdr", "sysA", "noisy")
    assert browser.run(VISIBLE_FILES) == expected
    fragment = browser.run("location.hash")
    assert fragment == "#metric=sisdr&system=sysA&minus=noisy&order=desc&size=25"
    keys = browser.run("Array.from(document.querySelectorAll('section.row .key'), e => e.textContent)")
    assert all(key.startswith("sisdr of sysA minus noisy: +") for key in keys)
    browser.open(page_url(page, "metric=estoi&system=sys%3CB%3E%26&minus=sysA&order=asc"))
    assert browser.run(VISIBLE_FILES) == gains(output, "estoi", "sys<B>&", "sysA")[::-1]
    assert browser.problems() == []


@pytest.mark.slow
@needs_chromium
def test_quick_ab_switches_systems_at_the_same_position(browser, evaluation):
    output, _ = evaluation
    browser.open(page_url(output / "report.html"))
    result = browser.run("""(async () => {
        const row = document.querySelector('section.row');
        while (row.querySelectorAll('audio').length < 4) { await new Promise(resolve => setTimeout(resolve, 50)); }
        const players = row.querySelectorAll('audio');
        const once = (element, type) => new Promise((resolve, reject) => {
            element.addEventListener(type, resolve, {once: true});
            setTimeout(() => reject(new Error(`no ${type} event within 5 s`)), 5000); });
        const press = key => document.dispatchEvent(new KeyboardEvent('keydown', {key: key, bubbles: true}));
        const state = () => ({
            active: Array.from(row.querySelectorAll('.source'), f => f.classList.contains('active')).indexOf(true),
            times: Array.from(players, p => p.currentTime), paused: Array.from(players, p => p.paused),
            status: row.querySelector('.status').textContent});
        players[1].preload = 'auto';
        players[1].load();
        await once(players[1], 'loadedmetadata');
        players[1].currentTime = 1.0;               // a listener moves the noisy player to 1 s
        await once(players[1], 'seeked');
        let seeked = once(players[2], 'seeked');
        press('3');                                 // sysA, from the same position
        await seeked;
        const afterThree = state();
        await new Promise(resolve => setTimeout(resolve, 500));
        seeked = once(players[1], 'seeked');
        press('x');                                 // back to noisy, where sysA has got to
        await seeked;
        return [afterThree, state()];
    })()""")
    after_three, after_x = result
    assert after_three["active"] == 2 and after_three["status"] == ""
    assert after_three["times"][2] == pytest.approx(1.0, abs=0.1)
    assert after_x["active"] == 1 and after_x["paused"][2] and not after_x["paused"][1]
    assert after_x["times"][1] == pytest.approx(after_x["times"][2], abs=0.1)
    assert after_x["times"][1] > 1.1  # sysA played on from 1 s before the switch back
    assert browser.problems() == []


@pytest.mark.slow
@needs_chromium
def test_a_whole_test_set_opens_quickly_one_page_at_a_time(browser, tmp_path):
    """824 files (VoiceBank+DEMAND's test set) by 8 sources (clean, noisy, two enhancers and
    their two refinements each): the first page shows at once; players are made and spectrograms
    fetched only for the rows near the view."""
    files = [f"p{index:04d}.wav" for index in range(824)]
    data = page_data(files, ["noisy", "dfn", "dfn+diffiner", "dfn+diffiner+", "nr", "nr+diffiner",
                             "nr+diffiner+"], tmp_path)
    output = tmp_path / "out"
    (output / "images").mkdir(parents=True)
    save_audio(str(tmp_path / "one.wav"), np.zeros(SR // 10, np.float32), SR)
    audio = {(f, s): "../one.wav" for f in files for s in data.sources}
    from PIL import Image

    png = output / "spectrogram.png"
    Image.new("P", (190, IMAGE_ROWS)).save(png)
    images = []
    for index in range(len(files)):
        links = {}
        for number, name in enumerate(data.sources):
            link = f"images/{index}-{number}.png"
            links[name] = (link, 190)
            os.link(png, output / link)  # one file per image, so that fetched ones can be told apart
        images.append(RowImages(-10.0, links))
    page = output / "report.html"
    page.write_text(render_page(data, audio, images, dict.fromkeys(data.sources, "16 kHz, mono")),
                    encoding="utf-8")
    sources = len(data.sources)
    started = time.monotonic()
    browser.open(page_url(page))
    first_row = browser.run(PLAYER_LABELS.replace("COUNT", str(sources)))
    seconds = time.monotonic() - started
    print(f"824 files x {sources} sources: first page with players in {seconds:.2f} s")
    assert ready(browser) == ["true", None]
    assert seconds < 20.0  # about 1 s on an idle 2-core machine; loose for a shared one
    assert f"clean, {files[0]}" in first_row
    assert browser.run(VISIBLE_FILES) == files[:25]
    assert browser.run("document.querySelectorAll('a.audio').length") == len(files) * sources
    assert sources <= browser.run("document.querySelectorAll('audio').length") <= 25 * sources
    assert browser.run(FIRST_ROW_IMAGE_HEIGHTS) == [IMAGE_ROWS] * sources
    fetched = browser.run("Array.from(document.images).filter(i => i.naturalWidth > 0).length")
    assert sources <= fetched <= 25 * sources
    browser.run("document.querySelector('.pager .next').click()")
    assert browser.run(VISIBLE_FILES) == files[25:50]
    labels = browser.run(PLAYER_LABELS.replace("COUNT", str(len(first_row) + sources)))
    assert f"clean, {files[25]}" in labels
    assert browser.problems() == []


@pytest.mark.slow
@needs_chromium
def test_a_missing_file_and_a_nan_file_are_shown_as_failures_on_a_page_that_opens(browser, tmp_path):
    """sysA lacks a.wav and holds a NaN sample in d.wav: the evaluation still writes the page, each
    of those cells says why every score was floored, and the page opens without an error."""
    corpus = snr_folders(tmp_path, FILES, SNRS, SECONDS, SR)
    os.remove(corpus["sysA"] / "a.wav")
    audio = sf.read(str(corpus["sysA"] / "d.wav"), dtype="float32")[0]
    audio[100] = np.nan
    write_wav(str(corpus["sysA"] / "d.wav"), audio, SR, "FLOAT")
    output = tmp_path / "out"
    assert main(evaluate_args(corpus, output)) == 0
    browser.open(page_url(output / "report.html"))
    assert ready(browser) == ["true", None]
    notes = browser.run("Array.from(document.querySelectorAll('figure.source .note'), n => n.textContent)")
    assert [n for n in notes if n.startswith("every score floored")] == [
        "every score floored: missing", "every score floored: file contains NaN or infinite samples"]
    assert browser.run(FIRST_ROW_IMAGE_HEIGHTS) == [IMAGE_ROWS] * len(SOURCES)
    assert browser.problems() == []
