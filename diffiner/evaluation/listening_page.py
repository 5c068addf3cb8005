"""The listening page: report.html in the evaluation's output folder, to hear and see every file of
every system next to its scores.

Built from what the evaluation holds in memory (the score rows, the summary), never from the files
it wrote. Works from file:// with no network: the style sheet, the script and the scores are
inline. Audio is linked by relative paths, to where it lies or (`copy_audio`) to copies under
report_files/audio, so that the output folder can be zipped and shared. Each file and system has a
small spectrogram PNG under report_files/spectrograms, drawn on one dB scale per file. A row gets
its players and loads its images only when it comes near the view, so that a whole test set opens
at once. Every file is written atomically.
"""

import html
import json
import logging
import math
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

from ..audio.io import AudioError, atomic_output, audio_info
from .plots import IMAGE_ROWS, SPECTROGRAM_RANGE_DB, colour_stops, write_row_images
from .report import format_cell, summary_notes
from .metrics import SCORING_RATE
from .scoring import FLOORS, INTRUSIVE_METRICS, METRIC_COLUMNS, SCORING_RATES

logger = logging.getLogger(__name__)

PAGE_NAME = "report.html"
MEDIA_FOLDER = "report_files"

# Rows shown per page at first: enough to compare a few files, few enough to open at once.
FIRST_PAGE_SIZE = 25

METRIC_DESCRIPTIONS = {
    "pesq": "wide-band PESQ (ITU-T P.862.2)",
    "estoi": "extended short-time objective intelligibility",
    "sisdr": "scale-invariant signal-to-distortion ratio, dB",
    "lsd": "log-spectral distance above 8 kHz (log10 power; lower is better)",
    "dnsmos": "DNSMOS P.835 (speech, background, overall) and P.808",
    "nisqa": "NISQA v2.0 (MOS, noisiness, coloration, discontinuity, loudness)",
}


@dataclass(frozen=True)
class PageData:
    """What the page shows, as the evaluation holds it.

    `sources` maps every folder's name to its path in playing order (clean first when given,
    then noisy and the systems); `reference` is the clean one's name, which has no scores.
    `rows` are scoring's rows (file, system, the metric columns, floored, not_scored, failed);
    `unlisted` the folders that could not be listed ({path: reason}).
    """

    files: Sequence[str]
    sources: Dict[str, str]
    reference: Optional[str]
    rows: Sequence[Dict[str, object]]
    metric_names: Sequence[str]
    columns: Sequence[str]
    summary: Dict[str, Dict[str, Dict[str, float]]]
    floored: Dict[str, int]
    unlisted: Dict[str, str]


@dataclass(frozen=True)
class RowImages:
    """One file's spectrograms: the dB value of the brightest colour and, per source, the
    image's link and width in pixels."""

    top_db: float
    images: Dict[str, Tuple[str, int]]


def _folder_label(index: int, name: str) -> str:
    """A folder name for a source that is safe whatever the system is called: its position plus
    the name with anything but letters, digits and ._+- replaced."""
    return f"{index}-{re.sub(r'[^A-Za-z0-9._+-]+', '_', name)}"


def _link(target: str, output_dir: str) -> str:
    """The URL of `target` relative to the page, percent-encoded (names may hold '#', '?', ' ')."""
    relative = os.path.relpath(os.path.abspath(target), os.path.abspath(output_dir))
    return quote(relative.replace(os.sep, "/"))


def _audio_links(output_dir: str, data: PageData, copy_audio: bool) -> Dict[Tuple[str, str], str]:
    """(file, source) -> the link a player uses; with `copy_audio`, each file is first copied
    (atomically) under report_files/audio where it exists."""
    links = {}
    for index, (name, root) in enumerate(data.sources.items()):
        for relative_path in data.files:
            source = os.path.join(root, relative_path)
            # A file the folder lacks keeps its link to where it would be: its row says it failed.
            if copy_audio and os.path.isfile(source):
                copy = os.path.join(output_dir, MEDIA_FOLDER, "audio", _folder_label(index, name), relative_path)
                with atomic_output(copy) as tmp:
                    shutil.copyfile(source, tmp)
                source = copy
            links[(relative_path, name)] = _link(source, output_dir)
    return links


def _draw_images(output_dir: str, data: PageData, workers: int, show_progress: bool = True) -> List[RowImages]:
    """Every file's spectrogram PNGs, in worker processes when `workers` > 1; a progress bar
    with `show_progress`."""
    from tqdm import tqdm

    labels = {name: _folder_label(index, name) for index, name in enumerate(data.sources)}
    audio, images = [], []
    for relative_path in data.files:
        audio.append({name: os.path.join(root, relative_path) for name, root in data.sources.items()})
        images.append({
            name: os.path.join(output_dir, MEDIA_FOLDER, "spectrograms", labels[name], relative_path + ".png")
            for name in data.sources
        })
    progress = dict(total=len(data.files), desc="spectrograms", unit="file", disable=not show_progress)
    if workers == 1:
        drawn = [write_row_images(*job) for job in tqdm(zip(audio, images), **progress)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_row_images, *job) for job in zip(audio, images)]
            try:
                drawn = [future.result() for future in tqdm(futures, **progress)]
            finally:
                # On an error or Ctrl-C, drop the queued files instead of drawing them first.
                for future in futures:
                    future.cancel()
    return [
        RowImages(top, {name: (_link(paths[name], output_dir), widths[name]) for name in data.sources})
        for (top, widths), paths in zip(drawn, images)
    ]


def _audio_format(root: str, files: Sequence[str]) -> str:
    """'16 kHz, mono' style summary of a folder's files as they are played (those whose header
    can be read: the others are failures that the rows name)."""
    infos = []
    for relative_path in files:
        try:
            infos.append(audio_info(os.path.join(root, relative_path)))
        except AudioError:
            continue
    if not infos:
        return "no readable file"
    rates = ", ".join(f"{rate / 1000:g}" for rate in sorted({rate for _, rate, _ in infos}))
    channels = sorted({count for _, _, count in infos})
    channel_text = "mono" if channels == [1] else f"{'/'.join(map(str, channels))} channels"
    return f"{rates} kHz, {channel_text}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """An HTML table of already escaped cells; columns from `numeric_from` on are right-aligned."""
    head = "".join(f"<th scope=\"col\">{cell}</th>" for cell in header)
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for cells in body:
        row = [f"<th scope=\"row\">{cells[0]}</th>"]
        for position, cell in enumerate(cells[1:], 1):
            align = " class=\"num\"" if position >= numeric_from else ""
            row.append(f"<td{align}>{cell}</td>")
        lines.append(f"<tr>{''.join(row)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _summary_section(data: PageData, formats: Dict[str, str]) -> str:
    """The summary table, its notes, what each metric scored and the folders played (`formats`:
    each folder's rates and channels)."""
    esc = html.escape
    floors = {name: FLOORS[name] for name in data.metric_names}
    count = len(data.files)
    body = [
        [esc(system)] + [esc(format_cell(stats[c], count)) for c in data.columns] + [str(data.floored[system])]
        for system, stats in data.summary.items()
    ]
    notes = "".join(f"<p class=\"note\">{esc(note)}</p>"
                    for note in summary_notes(data.summary, data.columns, count, floors, data.rows, data.unlisted))
    metric_rows = [
        [esc(name), esc(", ".join(METRIC_COLUMNS[name])), esc(METRIC_DESCRIPTIONS[name]),
         f"{SCORING_RATES[name] / 1000:g} kHz mono" if SCORING_RATES[name] else "the file's rate, mono",
         "yes" if name in INTRUSIVE_METRICS else "no", f"{FLOORS[name]:g}"]
        for name in data.metric_names
    ]
    source_rows = [[esc(name), esc(root), esc(formats[name])] for name, root in data.sources.items()]
    return "\n".join([
        "<section id=\"summary\"><h2>Summary</h2>",
        _table(["system", *map(esc, data.columns), "floored"], body),
        notes,
        "<h3>Metrics</h3>",
        "<p class=\"note\">Every metric scored each file mixed to mono, at the rate its row names; "
        "the players below play the files as they are.</p>",
        _table(["metric", "columns", "what it is", "scored at", "needs the clean reference", "floor"],
               metric_rows, numeric_from=5),
        "<h3>Folders</h3>",
        _table(["name", "folder", "files as played"], source_rows, numeric_from=3),
        "</section>",
    ])


def _score_text(row: Dict[str, object], column: str) -> str:
    """A score cell: the value, marked where it was set to the floor or not scored at all."""
    value = row[column]
    if column in row["not_scored"] or not math.isfinite(value):
        return "<abbr title=\"not scored for any system: undefined for this file\">n/a</abbr>"
    mark = " <abbr title=\"set to the metric's floor\">(floor)</abbr>" if column in row["floored"] else ""
    return f"{value:.3f}{mark}"


def _file_row(
    index: int, relative_path: str, data: PageData, by_key: Dict[Tuple[str, str], Dict[str, object]],
    audio: Dict[Tuple[str, str], str], images: RowImages,
) -> str:
    """One file: its name, the colour scale, and per source the link to its audio, the spectrogram
    and the scores. Rows after the first page start hidden; the script pages through them.

    The link becomes a player (the script adds an <audio> element labelled like it) when the row
    comes near the view: thousands of players made at once would take seconds to open the page.
    """
    esc = html.escape
    hidden = " hidden" if index >= FIRST_PAGE_SIZE else ""
    bottom = images.top_db - SPECTROGRAM_RANGE_DB
    figures = []
    for number, name in enumerate(data.sources, 1):
        label = esc(f"{name}, {relative_path}")
        image, width = images.images[name]
        row = by_key.get((relative_path, name))
        failed = f"<p class=\"note\">every score floored: {esc(row['failed'])}</p>" if row and row["failed"] else ""
        scores = ("<p class=\"note\">the reference</p>" if row is None else
                  failed + "<table class=\"scores\">" + "".join(
                      f"<tr><th scope=\"row\">{esc(c)}</th><td class=\"num\">{_score_text(row, c)}</td></tr>"
                      for c in data.columns) + "</table>")
        figures.append(
            f"<figure class=\"source\"><figcaption><button type=\"button\" class=\"pick\" data-source=\"{number - 1}\" "
            f"aria-pressed=\"false\" title=\"play {esc(name)} from the same position\">"
            f"<kbd>{number}</kbd> {esc(name)}</button></figcaption>"
            f"<div class=\"player\" data-label=\"{label}\"><a class=\"audio\" "
            f"href=\"{esc(audio[(relative_path, name)])}\" title=\"the audio file of {label}\">audio file</a></div>"
            f"<img class=\"spectrogram\" src=\"{esc(image)}\" loading=\"lazy\" decoding=\"async\" "
            f"width=\"{width}\" height=\"{IMAGE_ROWS}\" alt=\"spectrogram of {label}\">{scores}</figure>"
        )
    return (
        f"<section class=\"row\" data-file=\"{index}\"{hidden}><h3><span class=\"name\">{esc(relative_path)}</span> "
        f"<span class=\"key\"></span></h3><p class=\"note\">colours from {bottom:.0f} dB to {images.top_db:.0f} dB "
        f"(the loudest bin of this file's row), 0 to {SCORING_RATE / 2000:g} kHz</p>"
        f"<p class=\"status\" role=\"status\"></p><div class=\"sources\">{''.join(figures)}</div></section>"
    )


def _scores_json(data: PageData, by_key: Dict[Tuple[str, str], Dict[str, object]]) -> str:
    """The scores for sorting, file -> source -> column (null where there is none), with the
    names of each, as JSON that is safe inside a script element."""
    scores = []
    for relative_path in data.files:
        per_source = []
        for name in data.sources:
            row = by_key.get((relative_path, name))
            per_source.append([
                None if row is None or not math.isfinite(row[c]) else round(float(row[c]), 5) for c in data.columns
            ])
        scores.append(per_source)
    text = json.dumps({"files": list(data.files), "sources": list(data.sources), "columns": list(data.columns),
                       "scores": scores})
    # No markup characters inside the script element: "</script" would end it early and "<!--"
    # would change how the browser reads on. JSON's escapes keep the same strings.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _options(sources: Sequence[Tuple[int, str]], selected: Optional[int], first: Optional[str] = None) -> str:
    """<option>s for (position in `data.sources`, name) pairs, valued by the position (the
    script's index), after an empty-valued `first` option if given."""
    items = [f"<option value=\"\">{html.escape(first)}</option>"] if first is not None else []
    for index, name in sources:
        chosen = " selected" if index == selected else ""
        items.append(f"<option value=\"{index}\"{chosen}>{html.escape(name)}</option>")
    return "".join(items)


def render_page(
    data: PageData, audio: Dict[Tuple[str, str], str], images: Sequence[RowImages], formats: Dict[str, str]
) -> str:
    """The whole page as text, from the evaluation's data, the audio links, the drawn images and
    each folder's audio format (rates and channels, as `_audio_format` words them)."""
    esc = html.escape
    by_key = {(row["file"], row["system"]): row for row in data.rows}
    scored = [(index, name) for index, name in enumerate(data.sources) if name != data.reference]
    # Sorting starts set up for the gain of the last system over the first (or over noisy):
    # the change a refiner is judged by; the metric stays at "file name" until one is picked.
    target = scored[-1][0]
    baseline = scored[0][0] if len(scored) > 1 else None
    metric_options = "<option value=\"\">file name</option>" + "".join(
        f"<option value=\"{esc(c)}\">{esc(c)}</option>" for c in data.columns)
    page_sizes = "".join(f"<option value=\"{size}\">{size}</option>" for size in (FIRST_PAGE_SIZE, 100))
    pager = ("<nav class=\"pager\"><button type=\"button\" class=\"previous\">previous page</button> "
             "<span class=\"page-info\"></span> <button type=\"button\" class=\"next\">next page</button></nav>")
    rows = "\n".join(_file_row(i, f, data, by_key, audio, images[i]) for i, f in enumerate(data.files))
    gradient = ", ".join(colour_stops())
    systems = ", ".join(name for _, name in scored)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Listening page: {len(data.files)} files, {esc(systems)}</title>
<script>{ERROR_MARKER_SCRIPT}</script>
<style>{STYLE}
.colour-bar {{ background: linear-gradient(to right, {gradient}); }}
</style>
<noscript><style>.row[hidden] {{ display: block; }}</style></noscript>
</head>
<body>
<h1>Listening page</h1>
<p>{len(data.files)} files; scored: {esc(systems)}. Written by diffiner-evaluate with per_file.csv and
summary.md beside it.</p>
{_summary_section(data, formats)}
<section id="files"><h2>Files</h2>
<p class="note">Quick A/B: press <kbd>1</kbd>&ndash;<kbd>{min(len(data.sources), 9)}</kbd> to play that
source of the file last played (or of the first file shown) from the same position, <kbd>x</kbd> to go back
to the one heard before; a source's button does the same. The same key again pauses.</p>
<div class="scale"><span>{-SPECTROGRAM_RANGE_DB:g} dB</span><span class="colour-bar" role="img"
aria-label="colour scale from dark ({-SPECTROGRAM_RANGE_DB:g} dB) to bright (0 dB)"></span><span>0 dB
= the loudest bin of the file</span></div>
<form id="controls" onsubmit="return false">
<label>Sort by <select id="sort-metric">{metric_options}</select></label>
<label>of <select id="sort-system">{_options(scored, target)}</select></label>
<label>minus <select id="sort-minus">{_options(scored, baseline, first="nothing")}</select></label>
<label><select id="sort-order"><option value="desc">largest first</option>
<option value="asc">smallest first</option></select></label>
<label>Files per page <select id="page-size">{page_sizes}<option value="0">all</option></select></label>
</form>
<noscript><p>Sorting, paging and quick A/B need JavaScript; every file is listed below.</p></noscript>
{pager}
<div id="rows">
{rows}
</div>
{pager}
</section>
<script type="application/json" id="page-data">{_scores_json(data, by_key)}</script>
<script>{SCRIPT}</script>
</body>
</html>
"""


def write_listening_page(output_dir: str, data: PageData, workers: int = 1, copy_audio: bool = False,
                         progress: bool = True) -> str:
    """Draw the spectrograms, copy the audio if asked, write report.html; returns its path."""
    audio = _audio_links(output_dir, data, copy_audio)
    images = _draw_images(output_dir, data, max(1, min(workers, len(data.files))), progress)
    path = os.path.join(output_dir, PAGE_NAME)
    formats = {name: _audio_format(root, data.files) for name, root in data.sources.items()}
    text = render_page(data, audio, images, formats)
    # Explicitly UTF-8, as the meta tag says, whatever the locale's encoding.
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as stream:
        stream.write(text)
    logger.info("listening page with %d file(s) written to %s", len(data.files), path)
    return path


# Runs first: any script error leaves its message on the <html> element, where a test (or a
# reader, through the style sheet) sees it; the page itself never writes to the console.
ERROR_MARKER_SCRIPT = """
window.addEventListener("error", function (event) {
  document.documentElement.setAttribute("data-page-error", String(event.message));
});
window.addEventListener("unhandledrejection", function (event) {
  document.documentElement.setAttribute("data-page-error", String(event.reason));
});
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #1b1b1b; background: #fff; }
html[data-page-error]::before { content: "The page's script failed: " attr(data-page-error);
  display: block; padding: 0.5em 2em; background: #b00020; color: #fff; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.15em 0.6em; border-bottom: 1px solid #ddd; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; margin: 0.3em 0; }
.scale { display: flex; align-items: center; gap: 0.5em; margin: 0.5em 0; }
.colour-bar { display: inline-block; width: 16em; height: 1em; border: 1px solid #999; }
#controls { display: flex; flex-wrap: wrap; gap: 0.5em 1.2em; margin: 0.8em 0; }
.pager { margin: 0.6em 0; }
.row { border-top: 2px solid #ccc; padding: 0.4em 0 0.8em; content-visibility: auto;
  contain-intrinsic-size: auto 420px; }
.row[hidden] { display: none; }
.row h3 { margin: 0.2em 0; font-size: 1.05em; }
.key { font-weight: normal; color: #0b5394; margin-left: 1em; }
.status:empty { display: none; }
.status { color: #b00020; }
.sources { display: grid; grid-template-columns: repeat(auto-fill, minmax(15em, 1fr)); gap: 0.6em; }
.source { margin: 0; padding: 0.3em; border: 2px solid transparent; border-radius: 4px; }
.source.active { border-color: #0b5394; background: #eef4fb; }
.pick { font: inherit; font-weight: 600; cursor: pointer; background: none; border: none; padding: 0.1em 0; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 0.3em; font-size: 0.9em; background: #f6f6f6; }
audio { display: block; width: 100%; height: 2.2em; }
.player a { font-size: 0.8em; color: #0b5394; }
img.spectrogram { display: block; width: 100%; height: 6em; background: #000; }
table.scores { width: 100%; font-size: 0.9em; margin: 0.2em 0 0; }
table.scores th, table.scores td { padding: 0 0.3em; }
"""

# Sorting, paging, the address that records them (#metric=...&system=...), and quick A/B.
SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("page-data").textContent);
  var container = document.getElementById("rows");
  var rows = Array.prototype.slice.call(container.querySelectorAll("section.row"));
  var field = {
    metric: document.getElementById("sort-metric"),
    system: document.getElementById("sort-system"),
    minus: document.getElementById("sort-minus"),
    order: document.getElementById("sort-order"),
    size: document.getElementById("page-size")
  };
  var order = rows.map(function (row, index) { return index; });
  var page = 0;
  var current = null;  // {row, source, previous}: the player last played or moved

  // Players for a row's audio links; made once, when the row is about to be seen.
  function addPlayers(row) {
    row.querySelectorAll(".player").forEach(function (holder) {
      if (holder.querySelector("audio")) { return; }
      var audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "none";
      audio.src = holder.querySelector("a").getAttribute("href");
      audio.setAttribute("aria-label", holder.getAttribute("data-label"));
      audio.title = holder.getAttribute("data-label");
      holder.insertBefore(audio, holder.firstChild);
    });
  }

  function players(row) {
    addPlayers(row);
    return row.querySelectorAll("audio");
  }

  // The sort key of a file: a score of one system, or its difference from another's; null when
  // either is missing, and such files go last whichever the order.
  function key(file) {
    var column = data.columns.indexOf(field.metric.value);
    if (column < 0) { return null; }
    var value = data.scores[file][Number(field.system.value)][column];
    if (field.minus.value === "" || value === null) { return value; }
    var base = data.scores[file][Number(field.minus.value)][column];
    return base === null ? null : value - base;
  }

  function describe(value) {
    if (!field.metric.value) { return ""; }
    var text = field.metric.value + " of " + data.sources[Number(field.system.value)];
    if (field.minus.value !== "") {
      text += " minus " + data.sources[Number(field.minus.value)];
      if (value !== null && value >= 0) { return text + ": +" + value.toFixed(3); }
    }
    return text + ": " + (value === null ? "not scored" : value.toFixed(3));
  }

  function sortRows() {
    var keys = rows.map(function (row, index) { return key(index); });
    var sign = field.order.value === "asc" ? 1 : -1;
    order = rows.map(function (row, index) { return index; });
    if (field.metric.value) {
      order.sort(function (a, b) {
        if (keys[a] === null || keys[b] === null) { return (keys[a] === null) - (keys[b] === null) || a - b; }
        return sign * (keys[a] - keys[b]) || a - b;
      });
    }
    var fragment = document.createDocumentFragment();
    order.forEach(function (index) {
      rows[index].querySelector(".key").textContent = describe(keys[index]);
      fragment.appendChild(rows[index]);
    });
    container.appendChild(fragment);
  }

  function showPage() {
    var size = Number(field.size.value) || rows.length;
    var pages = Math.max(1, Math.ceil(rows.length / size));
    page = Math.min(Math.max(page, 0), pages - 1);
    order.forEach(function (index, position) {
      rows[index].hidden = Math.floor(position / size) !== page;
    });
    if (current && current.row.hidden) { players(current.row)[current.source].pause(); }
    document.querySelectorAll(".pager").forEach(function (pager) {
      pager.querySelector(".page-info").textContent =
        "page " + (page + 1) + " of " + pages + " (" + rows.length + " files)";
      pager.querySelector(".previous").disabled = page === 0;
      pager.querySelector(".next").disabled = page === pages - 1;
    });
  }

  function saveState() {
    var state = new URLSearchParams();
    if (field.metric.value) {
      state.set("metric", field.metric.value);
      state.set("system", data.sources[Number(field.system.value)]);
      if (field.minus.value !== "") { state.set("minus", data.sources[Number(field.minus.value)]); }
      state.set("order", field.order.value);
    }
    state.set("size", field.size.value);
    if (page > 0) { state.set("page", String(page + 1)); }
    history.replaceState(null, "", "#" + state.toString());
  }

  // Values not offered by a list (a stale or mistyped address) leave it as it is.
  function choose(select, value) {
    var known = Array.prototype.some.call(select.options, function (option) { return option.value === value; });
    if (value !== null && known) { select.value = value; }
  }

  function loadState() {
    var state = new URLSearchParams(location.hash.slice(1));
    function source(name) { var index = data.sources.indexOf(name); return index < 0 ? null : String(index); }
    choose(field.metric, state.get("metric"));
    choose(field.system, source(state.get("system")));
    if (state.has("metric")) { choose(field.minus, state.has("minus") ? source(state.get("minus")) : ""); }
    choose(field.order, state.get("order"));
    choose(field.size, state.get("size"));
    page = (Number(state.get("page")) || 1) - 1;
  }

  function report(row, text) { row.querySelector(".status").textContent = text; }

  function mark(row, source) {
    if (current && current.row !== row) {
      current.row.querySelectorAll(".source").forEach(function (figure) {
        figure.classList.remove("active");
      });
      current.row.querySelectorAll(".pick").forEach(function (button) {
        button.setAttribute("aria-pressed", "false");
      });
    }
    var previous = null;
    if (current && current.row === row) { previous = current.source === source ? current.previous : current.source; }
    current = {row: row, source: source, previous: previous};
    row.querySelectorAll(".source").forEach(function (figure, index) {
      figure.classList.toggle("active", index === source);
    });
    row.querySelectorAll(".pick").forEach(function (button, index) {
      button.setAttribute("aria-pressed", String(index === source));
    });
  }

  // Before its data is loaded a player cannot seek, so the position is applied once it is.
  function seek(audio, seconds) {
    if (audio.readyState > 0) {
      audio.currentTime = Math.min(seconds, audio.duration || seconds);
      return;
    }
    audio.preload = "auto";
    audio.addEventListener("loadedmetadata", function () {
      audio.currentTime = Math.min(seconds, audio.duration);
    }, {once: true});
  }

  function switchTo(row, source) {
    var list = players(row);
    var target = list[source];
    if (!target) { return; }
    var from = current && current.row === row ? list[current.source] : null;
    if (from === target && !target.paused) { target.pause(); return; }
    if (current && current.row !== row) { players(current.row)[current.source].pause(); }
    var position = from ? from.currentTime : 0;
    if (from && from !== target) { from.pause(); seek(target, position); }
    mark(row, source);
    report(row, "");
    var started = target.play();
    if (started) {
      started.catch(function (error) {
        // A later switch interrupting this start is expected, not a failure.
        if (error.name !== "AbortError") { report(row, "cannot play " + data.sources[source] + ": " + error.message); }
      });
    }
  }

  function firstShown() {
    var size = Number(field.size.value) || rows.length;
    return rows[order[page * size]];
  }

  document.addEventListener("play", function (event) {
    var row = event.target.closest(".row");
    var list = Array.prototype.slice.call(players(row));
    if (current) {
      var playing = players(current.row)[current.source];
      if (playing !== event.target) { playing.pause(); }
    }
    // The row's other sources are fetched now, so that switching to them starts at once.
    list.forEach(function (audio) { if (audio.preload !== "auto") { audio.preload = "auto"; } });
    mark(row, list.indexOf(event.target));
  }, true);

  // Moving a paused player's position makes it the one that the next switch starts from.
  document.addEventListener("seeking", function (event) {
    var row = event.target.closest(".row");
    var source = Array.prototype.indexOf.call(players(row), event.target);
    if (!current || current.row !== row || current.source !== source) { mark(row, source); }
  }, true);

  document.addEventListener("error", function (event) {
    if (event.target.tagName === "AUDIO") {
      report(event.target.closest(".row"), "cannot load " + event.target.getAttribute("aria-label"));
    }
  }, true);

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey || /^(INPUT|SELECT|TEXTAREA)$/.test(event.target.tagName)) {
      return;
    }
    var row = current && !current.row.hidden ? current.row : firstShown();
    var source;
    if (/^[1-9]$/.test(event.key)) {
      source = Number(event.key) - 1;
    } else if (/^[xX]$/.test(event.key) && current && current.row === row && current.previous !== null) {
      source = current.previous;
    } else {
      return;
    }
    event.preventDefault();
    switchTo(row, source);
  });

  container.addEventListener("click", function (event) {
    var button = event.target.closest(".pick");
    if (button) { switchTo(button.closest(".row"), Number(button.getAttribute("data-source"))); }
  });

  Object.keys(field).forEach(function (name) {
    field[name].addEventListener("change", function () {
      page = 0;
      if (name !== "size") { sortRows(); }
      showPage();
      saveState();
    });
  });
  document.querySelectorAll(".pager").forEach(function (pager) {
    pager.querySelector(".previous").addEventListener("click", function () { page -= 1; showPage(); saveState(); });
    pager.querySelector(".next").addEventListener("click", function () { page += 1; showPage(); saveState(); });
  });

  var nearView = new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      if (entry.isIntersecting) {
        addPlayers(entry.target);
        nearView.unobserve(entry.target);
      }
    });
  }, {rootMargin: "1500px 0px"});
  rows.forEach(function (row) { nearView.observe(row); });

  loadState();
  sortRows();
  showPage();
  document.documentElement.setAttribute("data-page-ready", "true");
}());
"""
