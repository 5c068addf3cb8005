"""Spectrograms: the figure of a few files (one row per system, clean and noisy first, one column
per file) and the listening page's small images (one per file and system); each file is drawn on
one colour scale across its systems."""

import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..audio.io import atomic_output
from .metrics import SCORING_RATE
from .scoring import read_signal


SPECTROGRAM_RANGE_DB = 80.0


def ovrl_ranking(rows: Sequence[Dict[str, object]], baseline: str, target: str) -> List[str]:
    """Files ordered from the largest DNSMOS OVRL gain of `target` over `baseline` to the
    largest loss; files where either score is undefined are left out."""
    ovrl = {(r["system"], r["file"]): r["dnsmos_ovrl"] for r in rows}
    changes = []
    for file in sorted({r["file"] for r in rows}):
        change = ovrl[(target, file)] - ovrl[(baseline, file)]
        if math.isfinite(change):
            changes.append((change, file))
    return [file for _, file in sorted(changes, reverse=True)]


def _log_spectrogram(signal: np.ndarray, hop: int = 128) -> np.ndarray:
    """Log-magnitude STFT in dB (32 ms window, 8 ms hop unless given), frequency on the first axis."""
    from scipy.signal import stft

    # At least one window's worth: for a shorter signal scipy would shrink the window, and with it
    # the number of frequency bins that the images rely on.
    signal = np.pad(signal, (0, max(0, 512 - signal.size)))
    _, _, spectrum = stft(signal, fs=SCORING_RATE, nperseg=512, noverlap=512 - hop)
    return 20.0 * np.log10(np.abs(spectrum) + 1e-10)


def _save_figure_atomic(figure, path: str) -> None:
    """Save a PNG under a temporary name in the destination folder, then rename it into place."""
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


# Figure size per panel, inches: wide panels, since a row compares one system across files.
PANEL_WIDTH, PANEL_HEIGHT = 4.0, 1.8


def plot_spectrograms(path: str, files: Sequence[str], sources: Dict[str, str]) -> None:
    """One row per source folder (clean, noisy, then each system, in order), one column per file.

    Reading down a column compares the systems on the same clip. Each column shares one colour
    scale (its loudest bin down to 80 dB below), so rows can be compared by eye. Uses the Agg
    canvas directly, never pyplot's global state or backend.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(PANEL_WIDTH * len(files), PANEL_HEIGHT * len(sources)), layout="constrained")
    axes = figure.subplots(len(sources), len(files), squeeze=False)
    for column, relative_path in enumerate(files):
        # A file a folder lacks or that cannot be read (a failure the scores already count) gets
        # a panel saying why, not a figure that stops the run.
        read = {name: read_signal(os.path.join(root, relative_path)) for name, root in sources.items()}
        spectra = {name: _log_spectrogram(signal.at_16k) for name, (signal, _) in read.items() if signal is not None}
        top = max((float(s.max()) for s in spectra.values()), default=0.0)
        image = None
        for row, (name, (signal, problem)) in enumerate(read.items()):
            axis = axes[row][column]
            axis.set_title(f"{name} — {relative_path}", fontsize=8)
            if signal is None:
                axis.text(0.5, 0.5, problem, ha="center", va="center", fontsize=8, wrap=True)
                axis.set_xticks([])
                axis.set_yticks([])
                continue
            image = axis.imshow(
                spectra[name], origin="lower", aspect="auto", cmap="magma",
                extent=(0.0, signal.at_16k.size / SCORING_RATE, 0.0, SCORING_RATE / 2000.0),
                vmin=top - SPECTROGRAM_RANGE_DB, vmax=top,
            )
            axis.set_xlabel("time [s]" if row == len(sources) - 1 else "")
            axis.set_ylabel("kHz" if column == 0 else "")
        if image is not None:
            figure.colorbar(image, ax=[axes[row][column] for row in range(len(sources))], label="dB")
    _save_figure_atomic(figure, path)


# The listening page's images: a 16 ms hop, 128 frequency rows (pairs of STFT bins) and at most
# MAX_IMAGE_COLUMNS columns keep a whole test set's images (824 files x 8 systems) small and quick
# to write; a page shows them a few hundred pixels wide, so finer detail would not be seen.
IMAGE_HOP = 256
IMAGE_ROWS = 128
MAX_IMAGE_COLUMNS = 640


def _image_spectrogram(signal: np.ndarray) -> np.ndarray:
    """The page's coarse dB spectrogram: IMAGE_ROWS x at most MAX_IMAGE_COLUMNS, low frequencies
    first. Bins and frames are merged by their maximum, so that short loud events stay visible."""
    spectrum = _log_spectrogram(signal, hop=IMAGE_HOP)[:-1]  # the Nyquist bin makes 257 rows
    spectrum = spectrum.reshape(IMAGE_ROWS, -1, spectrum.shape[1]).max(axis=1)
    factor = -(-spectrum.shape[1] // MAX_IMAGE_COLUMNS)
    if factor > 1:
        padding = factor * -(-spectrum.shape[1] // factor) - spectrum.shape[1]
        spectrum = np.pad(spectrum, ((0, 0), (0, padding)), mode="edge")
        spectrum = spectrum.reshape(IMAGE_ROWS, -1, factor).max(axis=2)
    return spectrum


def _palette(colormap: str = "magma") -> List[int]:
    """The colour map as a 256-entry RGB palette, for 8-bit palette PNGs (a third of the size of
    RGB ones)."""
    import matplotlib

    colours = matplotlib.colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3]
    return [int(v) for v in np.round(colours * 255).astype(np.uint8).reshape(-1)]


def colour_stops(count: int = 9) -> List[str]:
    """`count` evenly spaced colours of the image palette as CSS hex, for a colour bar drawn in
    the page's style sheet rather than as pixels."""
    palette = np.array(_palette()).reshape(256, 3)
    indices = np.round(np.linspace(0, 255, count)).astype(int)
    return ["#%02x%02x%02x" % tuple(palette[i]) for i in indices]


def write_row_images(audio_paths: Dict[str, str], image_paths: Dict[str, str]) -> Tuple[float, Dict[str, int]]:
    """Draw one file's spectrogram for every system into its PNG, all on one colour scale: the
    loudest bin of the row down to SPECTROGRAM_RANGE_DB below it, so that systems are compared
    by eye. Returns that top in dB and each image's width in pixels (its height is IMAGE_ROWS).

    Reads the 16 kHz mono signal the metrics scored; a file that cannot be read is drawn black,
    one pixel wide. Runs in worker processes, hence plain arguments. Each PNG is written
    atomically.
    """
    from PIL import Image

    signals = {name: read_signal(path)[0] for name, path in audio_paths.items()}
    spectra = {name: _image_spectrogram(signal.at_16k) for name, signal in signals.items() if signal is not None}
    top = max((float(spectrum.max()) for spectrum in spectra.values()), default=0.0)
    # A file that is missing or cannot be read (its scores say why) gets one black column, so that
    # the page keeps one image per source.
    blank = np.full((IMAGE_ROWS, 1), -np.inf)
    spectra = {name: spectra.get(name, blank) for name in audio_paths}
    palette = _palette()
    widths = {}
    for name, spectrum in spectra.items():
        levels = np.clip((spectrum - top) / SPECTROGRAM_RANGE_DB + 1.0, 0.0, 1.0)
        # Row 0 of an image is its top: flip so that low frequencies are at the bottom.
        image = Image.fromarray(np.round(levels[::-1] * 255).astype(np.uint8))
        image.putpalette(palette)
        with atomic_output(image_paths[name]) as tmp:
            image.save(tmp, format="PNG")
        widths[name] = spectrum.shape[1]
    return top, widths
