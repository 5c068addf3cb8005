"""Spectrogram figures: one row per system (clean and noisy first), one column per file, each file
on one colour scale."""

import math
import os
from typing import Dict, List, Sequence

import numpy as np

from ..audio.io import MODEL_SAMPLE_RATE, atomic_output
from .scoring import load_mono_16k


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


def _log_spectrogram(signal: np.ndarray) -> np.ndarray:
    """Log-magnitude STFT in dB (32 ms window, 8 ms hop), frequency on the first axis."""
    from scipy.signal import stft

    _, _, spectrum = stft(signal, fs=MODEL_SAMPLE_RATE, nperseg=512, noverlap=384)
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
        signals = {
            name: load_mono_16k(os.path.join(root, relative_path)) for name, root in sources.items()
        }
        spectra = {name: _log_spectrogram(signal) for name, signal in signals.items()}
        top = max(float(s.max()) for s in spectra.values())
        for row, (name, spectrum) in enumerate(spectra.items()):
            axis = axes[row][column]
            duration = signals[name].size / MODEL_SAMPLE_RATE
            image = axis.imshow(
                spectrum, origin="lower", aspect="auto", cmap="magma",
                extent=(0.0, duration, 0.0, MODEL_SAMPLE_RATE / 2000.0),
                vmin=top - SPECTROGRAM_RANGE_DB, vmax=top,
            )
            axis.set_title(f"{name} — {relative_path}", fontsize=8)
            axis.set_xlabel("time [s]" if row == len(sources) - 1 else "")
            axis.set_ylabel("kHz" if column == 0 else "")
        figure.colorbar(image, ax=[axes[row][column] for row in range(len(sources))], label="dB")
    _save_figure_atomic(figure, path)
