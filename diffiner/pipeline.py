"""Refining recordings: from (noisy, processed) waveforms to refined waveforms.

This is the one code path shared by the Python API and `scripts/run_refiner.py`:

1. `Refiner.prepare` turns a pair of recordings into segments: per channel, and for long
   recordings overlapping windows of at most `max_dur` seconds; each segment's spectrogram is
   padded only to the network's multiple (32 frames for the published model).
2. `Refiner.run_segments` refines segments of equal width together in batches. Every segment
   has its own random generator, seeded from the seed and the segment's key, so its result does
   not depend on which other segments share its batch.
3. `Refiner.assemble` joins segments with a normalised cross-fade and trims to the input length.
"""

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .acceleration import build_runner, estimate_max_batch_frames
from .audio import MODEL_SAMPLE_RATE, resample
from .refiner import refine, resolve_etas
from .script_util import create_model_and_diffusion, model_and_diffusion_defaults
from .spectrogram import noise_map, num_frames, spec_to_wave, wave_to_spec

logger = logging.getLogger(__name__)

@dataclass
class Segment:
    """One mono window of one recording, ready for the network."""

    noisy: torch.Tensor  # (2, 256, width) spectrogram of the noisy window, zero-padded
    noise_map: torch.Tensor  # (1, 256, width)
    samples: int  # length of the window in samples (16 kHz)
    seed: int  # seed of this segment's generator

    @property
    def width(self) -> int:
        return self.noisy.shape[-1]


@dataclass
class Prepared:
    """A recording split into segments, with what is needed to put it back together."""

    segments: List[Segment]
    bounds: List[Tuple[int, int]]  # (start, end) sample of each window, the same for every channel
    channels: int
    samples: int  # length at 16 kHz
    sample_rate: int  # the caller's sample rate
    input_samples: int  # length at the caller's sample rate


def segment_seed(seed: int, key: str, channel: int, index: int) -> int:
    """A 63-bit seed that depends only on the run's seed and the segment's identity."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{channel}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def segment_bounds(samples: int, max_samples: int, overlap: int) -> List[Tuple[int, int]]:
    """Windows of at most `max_samples` covering `samples`, overlapping by at least `overlap`.

    All windows of a long recording have the same length, so they batch together.
    """
    if samples <= max_samples:
        return [(0, samples)]
    if not 0 <= overlap < max_samples:
        raise ValueError(f"segment overlap ({overlap} samples) must be shorter than a segment ({max_samples})")
    count = math.ceil((samples - overlap) / (max_samples - overlap))
    count = max(count, 2)
    starts = [round(k * (samples - max_samples) / (count - 1)) for k in range(count)]
    return [(s, s + max_samples) for s in starts]


def padded_width(samples: int, multiple: int, max_samples: int) -> int:
    """Spectrogram width the network sees for a recording of `samples` (16 kHz).

    Recordings longer than `max_samples` are cut into windows of exactly `max_samples`, so their
    width is that of one window; the frame count is padded up to the network's `multiple`.
    """
    frames = num_frames(min(samples, max_samples))
    return multiple * math.ceil(frames / multiple)


def crossfade_join(chunks: Sequence[np.ndarray], bounds: Sequence[Tuple[int, int]], samples: int,
                   overlap: int) -> np.ndarray:
    """Overlap-add windows with linear fades over `overlap` samples, normalised by the weights."""
    if len(chunks) == 1:
        return chunks[0]
    out = np.zeros(samples, dtype=np.float64)
    total = np.zeros(samples, dtype=np.float64)
    ramp = (np.arange(overlap) + 0.5) / max(overlap, 1)
    for k, (chunk, (start, end)) in enumerate(zip(chunks, bounds)):
        weight = np.ones(end - start)
        if k > 0 and overlap:
            weight[:overlap] = ramp
        if k < len(chunks) - 1 and overlap:
            weight[-overlap:] = np.minimum(weight[-overlap:], ramp[::-1])
        out[start:end] += weight * chunk
        total[start:end] += weight
    return (out / total).astype(np.float32)


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a plain state dict (as published, or as written by training), on the CPU.

    Accepts files saved from a DistributedDataParallel-wrapped model ("module." prefix).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        state = torch.load(path, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_model(model_path: str, model_settings: Optional[Dict] = None):
    """(model, diffusion) built from `model_settings` (defaults: the published configuration)
    with the weights at `model_path`; ValueError naming the file when they do not fit."""
    settings = model_and_diffusion_defaults()
    settings.update(model_settings or {})
    model, diffusion = create_model_and_diffusion(**settings)
    try:
        model.load_state_dict(load_state_dict(model_path), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{model_path}: the weights do not fit the model settings "
            f"(image_size={settings['image_size']}, num_channels={settings['num_channels']}, "
            f"num_res_blocks={settings['num_res_blocks']}, ...): {exc}"
        ) from exc
    return model, diffusion


class Refiner:
    """A loaded model plus refinement settings: refines pairs of recordings.

    Example::

        refiner = Refiner.from_checkpoint("pretrained_diffiner_onVB.pt")
        refined = refiner.refine(noisy, processed, sample_rate=16000)
    """

    def __init__(self, model: torch.nn.Module, diffusion, *, method: str = "diffiner+",
                 eta_a: Optional[float] = None, eta_b: Optional[float] = None,
                 eta_c: Optional[float] = None, eta_d: Optional[float] = None,
                 clip_denoised: bool = False, max_dur: float = 10.0, segment_overlap: float = 1.0,
                 batch_size: int = 8, max_batch_frames: Optional[int] = None, precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False, cuda_graphs: bool = False,
                 width_bucket: Optional[int] = None, device=None):
        self.etas = resolve_etas(method, eta_a, eta_b, eta_c, eta_d)
        if max_dur <= 0 or segment_overlap < 0 or segment_overlap >= max_dur:
            raise ValueError(f"need max_dur > segment_overlap >= 0, got {max_dur} and {segment_overlap}")
        if batch_size < 1 or (max_batch_frames is not None and max_batch_frames < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {max_batch_frames}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.network = build_runner(self.model, precision, channels_last, compile, cuda_graphs)
        self.diffusion = diffusion
        self.method = method
        self.precision = precision
        self.clip_denoised = clip_denoised
        self.max_samples = int(round(max_dur * MODEL_SAMPLE_RATE))
        self.overlap_samples = int(round(segment_overlap * MODEL_SAMPLE_RATE))
        self.batch_size = batch_size
        self.max_batch_frames = max_batch_frames
        self.multiple = getattr(model, "downsample_factor", 1)
        # Widths are padded to this: the network's multiple, or coarser so that a compiled
        # network sees a handful of shapes instead of one per file length.
        self.width_bucket = width_bucket or (128 if compile or cuda_graphs else self.multiple)
        if self.width_bucket % self.multiple:
            raise ValueError(f"width_bucket {self.width_bucket} must be a multiple of {self.multiple}")

    @classmethod
    def from_checkpoint(cls, model_path: str, *, device=None, timestep_respacing: str = "ddim200",
                        model_settings: Optional[Dict] = None, **refiner_settings) -> "Refiner":
        """Build the network from `model_settings` (defaults: the published configuration),
        load the weights at `model_path`, and wrap it with the given refinement settings."""
        settings = dict(model_settings or {}, timestep_respacing=timestep_respacing)
        model, diffusion = load_model(model_path, settings)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, diffusion, device=device, **refiner_settings)

    def padded_width(self, samples: int) -> int:
        """Width of the segments of a recording of `samples` samples at 16 kHz."""
        return padded_width(samples, self.width_bucket, self.max_samples)

    def batch_size_for(self, width: int) -> int:
        """Segments per batch at `width`: from the frame budget when set, else `batch_size`."""
        if self.max_batch_frames:
            return max(1, self.max_batch_frames // width)
        return self.batch_size

    def auto_max_batch_frames(self, width: int) -> None:
        """Set the frame budget from the free GPU memory, measured at the widest `width`.

        Keeps `batch_size` when there is no GPU or the measurement fails.
        """
        try:
            self.max_batch_frames = estimate_max_batch_frames(self.network, self.model, self.device, width)
        except RuntimeError as exc:
            logger.warning("could not size batches from GPU memory (%s); using batch_size %d", exc, self.batch_size)

    # ----- the three stages -----
    def prepare(self, noisy: np.ndarray, processed: np.ndarray, sample_rate: int, seed: int = 0,
                key: str = "") -> Prepared:
        """Resample to 16 kHz, split into channels and windows, and compute the spectrograms.

        `noisy` and `processed` are (samples,) or (channels, samples) at `sample_rate`; a mono
        side is shared with every channel of the other.
        """
        noisy2d, processed2d = _as_2d(noisy, "noisy"), _as_2d(processed, "processed")
        if noisy2d.shape[-1] != processed2d.shape[-1]:
            raise ValueError(f"noisy and processed lengths differ: {noisy2d.shape[-1]} vs {processed2d.shape[-1]} samples")
        channels = max(noisy2d.shape[0], processed2d.shape[0])
        for name, arr in (("noisy", noisy2d), ("processed", processed2d)):
            if arr.shape[0] not in (1, channels):
                raise ValueError(f"channel counts differ: noisy {noisy2d.shape[0]}, processed {processed2d.shape[0]}")
        input_samples = noisy2d.shape[-1]
        noisy16 = resample(noisy2d, sample_rate, MODEL_SAMPLE_RATE)
        processed16 = resample(processed2d, sample_rate, MODEL_SAMPLE_RATE)
        samples = noisy16.shape[-1]
        bounds = segment_bounds(samples, self.max_samples, self.overlap_samples)
        segments = []
        for channel in range(channels):
            y_wave = torch.from_numpy(noisy16[min(channel, noisy16.shape[0] - 1)])
            p_wave = torch.from_numpy(processed16[min(channel, processed16.shape[0] - 1)])
            for index, (start, end) in enumerate(bounds):
                y_spec = wave_to_spec(y_wave[start:end])
                sigma = noise_map(y_spec, wave_to_spec(p_wave[start:end]))
                pad = (0, self.padded_width(end - start) - y_spec.shape[-1])
                segments.append(Segment(
                    noisy=torch.nn.functional.pad(y_spec, pad), noise_map=torch.nn.functional.pad(sigma, pad),
                    samples=end - start, seed=segment_seed(seed, key, channel, index),
                ))
        return Prepared(segments, bounds, channels, samples, sample_rate, input_samples)

    def plan_batches(self, segments: Sequence[Segment]) -> List[List[int]]:
        """Indices of `segments` grouped into batches: equal widths only, sized by batch_size_for."""
        by_width: Dict[int, List[int]] = {}
        for i, seg in enumerate(segments):
            by_width.setdefault(seg.width, []).append(i)
        batches = []
        for width, indices in by_width.items():
            size = self.batch_size_for(width)
            batches += [indices[lo:lo + size] for lo in range(0, len(indices), size)]
        return batches

    def run_segments(self, segments: Sequence[Segment], progress: bool = False) -> List[torch.Tensor]:
        """Refine segments (any widths) and return their waveforms at 16 kHz, in order."""
        results: List[Optional[torch.Tensor]] = [None] * len(segments)
        for batch in self.plan_batches(segments):
            for i, wave in zip(batch, self.refine_batch([segments[i] for i in batch], progress)):
                results[i] = wave
        return results

    def refine_batch(self, batch: Sequence[Segment], progress: bool = False) -> List[torch.Tensor]:
        """Refine segments of equal width in one batch; returns 16 kHz waveforms on the CPU."""
        noisy = torch.stack([seg.noisy for seg in batch]).to(self.device)
        sigma = torch.stack([seg.noise_map for seg in batch]).to(self.device)
        generators = [self._generator(seg.seed) for seg in batch]
        spec = refine(
            self.network, self.diffusion, noisy, sigma, method=self.method, clip_denoised=self.clip_denoised,
            generator=generators, progress=progress, **self.etas,
        )
        spec = spec.float().cpu()
        return [
            spec_to_wave(spec[k, :, :, :num_frames(seg.samples)], seg.samples) for k, seg in enumerate(batch)
        ]

    def assemble(self, prepared: Prepared, waves: Sequence[torch.Tensor],
                 output_sample_rate: Optional[int] = None) -> np.ndarray:
        """Join refined windows into (channels, samples) at `output_sample_rate` (16 kHz if None).

        At the caller's own sample rate the output has exactly the input's sample count.
        """
        per_channel = len(prepared.bounds)
        joined = np.stack([
            crossfade_join([w.numpy() for w in waves[c * per_channel:(c + 1) * per_channel]],
                           prepared.bounds, prepared.samples, self.overlap_samples)
            for c in range(prepared.channels)
        ])
        rate = output_sample_rate or MODEL_SAMPLE_RATE
        length = prepared.input_samples if rate == prepared.sample_rate else None
        return resample(joined, MODEL_SAMPLE_RATE, rate, length=length)

    # ----- the Python API -----
    def refine(self, noisy: np.ndarray, processed: np.ndarray, sample_rate: int, *, seed: int = 0,
               key: str = "", output_sample_rate: Optional[int] = None, progress: bool = False) -> np.ndarray:
        """Refine one recording pair; returns float32 audio shaped like `processed`.

        The output is at `output_sample_rate`, by default the input's `sample_rate`, with the
        same duration. `key` names the recording in the seed (the CLI uses its relative path).
        """
        prepared = self.prepare(noisy, processed, sample_rate, seed=seed, key=key)
        waves = self.run_segments(prepared.segments, progress=progress)
        out = self.assemble(prepared, waves, output_sample_rate or sample_rate)
        return out[0] if np.ndim(processed) == 1 and np.ndim(noisy) == 1 else out

    def _generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen


def _as_2d(audio: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(audio, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] == 0:
        raise ValueError(f"{name} must be non-empty (samples,) or (channels, samples), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite samples")
    return arr
