"""Noisy versions of the demo's clean clips, made at run time and identical on every run.

Only the clean clips are shipped (demo/audio/clean); the noisy set is derived from them so that
the repository stays small and the noise conditions are documented by code instead of by binary
files. Every noisy file keeps its clean file's relative path, so clean, noisy and processed
folders pair by name, and carries one noise condition (colour, SNR). Conditions are dealt out in
turn over the files sorted by path, so a handful of clips covers every colour and every SNR; the
noise itself comes from a generator seeded by the seed and the file's path, never from global
random state, so the result does not depend on the machine, the order of work or anything else.

`python -m diffiner.commands.make_noisy_set CLEAN OUT` runs it from the shell (stage 1 of
`run_example.sh --demo`).
"""

import csv
import io
import logging
import os
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

from ..seeding import numpy_rng
from .folders import FolderResult, check_write_rules, convert_folder, output_lock, scan_audio_files
from .io import write_text_atomic
from .records import OutputRecord

logger = logging.getLogger(__name__)

WRITER = "make_noisy_set"  # in output folders' lock files

NOISE_COLOURS = ("white", "pink", "brown", "babble", "hum")
DEFAULT_SNRS = (0.0, 5.0, 10.0)
CONDITIONS_FILE = "conditions.csv"
PEAK_LIMIT = 0.99  # mixtures louder than this are scaled down rather than clipped
LOWEST_FREQUENCY_HZ = 20.0  # coloured spectra are flat below this: no sub-audible drift
BABBLE_TALKERS = 6
SYLLABLE_RATE_HZ = 4.0  # babble envelopes fluctuate at about the syllable rate of speech
HUM_FUNDAMENTAL_HZ = 50.0
HUM_HARMONICS = 12


@dataclass(frozen=True)
class Condition:
    """The noise one file gets; `gain` is what the mixture was scaled by to avoid clipping."""

    colour: str
    snr_db: float
    gain: float = 1.0


def _shaped_noise(rng: np.random.Generator, samples: int, rate: int, exponent: float) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    freqs = np.maximum(np.fft.rfftfreq(samples, 1.0 / rate), LOWEST_FREQUENCY_HZ)
    spectrum *= freqs ** (-exponent / 2.0)
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n=samples)


def _lowpass_noise(rng: np.random.Generator, samples: int, rate: int, cutoff_hz: float) -> np.ndarray:
    """Gaussian noise with nothing above `cutoff_hz`: a slowly wandering random curve."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    spectrum[np.fft.rfftfreq(samples, 1.0 / rate) > cutoff_hz] = 0.0
    return np.fft.irfft(spectrum, n=samples)


def _babble(rng: np.random.Generator, samples: int, rate: int) -> np.ndarray:
    """Several 'talkers': speech-shaped noise (pink-like) switched on and off at syllable rate.

    Not real babble, but it is non-stationary in the same way, which is what makes stationary
    noise estimators struggle.
    """
    total = np.zeros(samples)
    for _ in range(BABBLE_TALKERS):
        envelope = np.maximum(_lowpass_noise(rng, samples, rate, SYLLABLE_RATE_HZ), 0.0)
        total += _shaped_noise(rng, samples, rate, 1.0) * envelope / (envelope.std() + 1e-12)
    return total


def _hum(rng: np.random.Generator, samples: int, rate: int) -> np.ndarray:
    """Mains hum: 50 Hz and its harmonics with random phases, over a faint white floor."""
    t = np.arange(samples) / rate
    hum = np.zeros(samples)
    for k in range(1, HUM_HARMONICS + 1):
        if k * HUM_FUNDAMENTAL_HZ < rate / 2:
            hum += np.sin(2 * np.pi * k * HUM_FUNDAMENTAL_HZ * t + rng.uniform(0, 2 * np.pi)) / k
    floor = rng.standard_normal(samples)
    return hum / hum.std() + 0.1 * floor


_GENERATORS = {
    "white": lambda rng, n, sr: _shaped_noise(rng, n, sr, 0.0),
    "pink": lambda rng, n, sr: _shaped_noise(rng, n, sr, 1.0),
    "brown": lambda rng, n, sr: _shaped_noise(rng, n, sr, 2.0),
    "babble": _babble,
    "hum": _hum,
}


def make_noise(colour: str, samples: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """`samples` of unit-power noise of the given colour (float64, mono)."""
    if colour not in _GENERATORS:
        raise ValueError(f"unknown noise colour {colour!r}; choose from {', '.join(NOISE_COLOURS)}")
    noise = _GENERATORS[colour](rng, samples, rate)
    return noise / np.sqrt(np.mean(noise ** 2))


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> Tuple[np.ndarray, float]:
    """clean + noise scaled to `snr_db` over the whole file, scaled down if it would clip.

    Returns (mixture, gain); the clean part of the mixture is `gain * clean`. Scaling the sum
    keeps the SNR exact, where clipping would not.
    """
    clean_power = np.mean(clean.astype(np.float64) ** 2)
    if clean_power == 0:
        raise ValueError("cannot set an SNR against a silent clean signal")
    noise_power = np.mean(noise ** 2)
    mixture = clean + noise * np.sqrt(clean_power / (noise_power * 10 ** (snr_db / 10)))
    peak = np.max(np.abs(mixture))
    gain = min(1.0, PEAK_LIMIT / peak)
    return (mixture * gain).astype(np.float32), float(gain)


def assign_conditions(rels: Sequence[str], snrs: Sequence[float], colours: Sequence[str]) -> Dict[str, Condition]:
    """Deal colours and SNRs out in turn over the sorted paths.

    Colours and SNRs cycle independently, so with coprime counts (5 colours, 3 SNRs) every pair
    comes up once in 15 files and a few files already cover every colour and every SNR.
    """
    return {rel: Condition(colours[i % len(colours)], float(snrs[i % len(snrs)]))
            for i, rel in enumerate(sorted(rels))}


def format_conditions_csv(conditions: Dict[str, Condition]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "colour", "snr_db", "gain"])
    for rel, cond in sorted(conditions.items()):
        writer.writerow([rel, cond.colour, f"{cond.snr_db:g}", f"{cond.gain:.6f}"])
    return buffer.getvalue()


def make_noisy_set(clean_dir: str, out_dir: str, snrs: Sequence[float] = DEFAULT_SNRS,
                   colours: Sequence[str] = NOISE_COLOURS, seed: int = 0, progress: bool = True,
                   overwrite: bool = False) -> FolderResult:
    """Write a noisy copy of every clean file (16-bit WAV at the clean file's rate and channels)
    plus `conditions.csv` (file, colour, snr_db, gain; one row per noisy file of the set) to
    `out_dir`.

    A rerun skips the files already made from the same clean file with the same condition (the
    writer's record, `records.OutputRecord`), and redoes those whose clean file or condition
    changed (a clean file added before them in sorted order shifts the conditions dealt out). A
    folder made with other SNRs, colours or seed is refused (SettingsError) unless `overwrite`,
    which deletes the files its record lists and makes the set anew: the enhanced and refined
    files made from the old set are then redone by their writers, whose records see the change.
    A clean file that cannot be read or is silent is recorded in the result's `failed`, and the
    others are still written. Raises ValueError for unknown colours or an empty SNR or colour
    list, FileNotFoundError for a missing folder, FolderError for an output folder that the write
    rules refuse or that another run holds (the lock covers conditions.csv too).
    """
    unknown = [c for c in colours if c not in _GENERATORS]
    if unknown or not colours or not snrs:
        raise ValueError(f"need at least one SNR and colours from {', '.join(NOISE_COLOURS)}; got "
                         f"snrs={list(snrs)}, colours={list(colours)}")
    check_write_rules({clean_dir: clean_dir}, out_dir, WRITER)
    # Conditions are assigned over the whole sorted listing, so it is made before any file is written.
    listing = scan_audio_files(clean_dir, exclude=[out_dir])
    conditions = assign_conditions(listing.files, snrs, colours)

    def add_noise(rel: str, clean: np.ndarray, rate: int) -> Tuple[np.ndarray, int]:
        cond = conditions[rel]
        rng = numpy_rng(seed, rel)
        noise = np.stack([make_noise(cond.colour, clean.shape[-1], rate, rng) for _ in range(clean.shape[0])])
        noisy, gain = mix_at_snr(clean, noise, cond.snr_db)
        conditions[rel] = Condition(cond.colour, cond.snr_db, gain)
        return noisy, rate

    settings = {"snrs": [float(s) for s in snrs], "colours": list(colours), "seed": seed}
    with output_lock(out_dir, WRITER):
        result = convert_folder(
            clean_dir, out_dir, add_noise, overwrite=overwrite, progress=progress, desc="adding noise",
            listing=listing, writer=WRITER, settings=settings,
            made=lambda rel: {"colour": conditions[rel].colour, "snr_db": conditions[rel].snr_db},
            info=lambda rel: {"gain": conditions[rel].gain})
        recorded = OutputRecord.read(out_dir, WRITER).files
        in_set = {rel: Condition(conditions[rel].colour, conditions[rel].snr_db, float(recorded[rel].get("gain", 1.0)))
                  for rel in listing.files if rel in recorded and rel not in result.failed}
        write_text_atomic(os.path.join(out_dir, CONDITIONS_FILE), format_conditions_csv(in_set))
    logger.info("wrote %d noisy file(s) to %s", len(result.written), out_dir)
    return result
