"""Refining recordings: from (noisy, processed) waveforms to refined waveforms.

This is the one code path shared by the Python API, the folder command and the benchmarks:

1. `Refiner.prepare` turns a pair of recordings into segments: per channel, and for long
   recordings overlapping windows of at most `max_dur` seconds; each window is followed by
   silence only up to the network's multiple of frames (32 for the published model), keeping at
   least one frame past the signal (see `padded_width`). Recordings shorter than the STFT allows
   are zero-padded first (`MIN_SAMPLES`).
2. `Refiner.refine_stream`, the one batch runner, groups the segments of recordings that arrive
   one by one (a folder, or `run_segments`' list) into batches of equal width, and
   `Refiner.run_batch` refines one batch. Every segment has its own random generator, seeded
   from the seed and the segment's identity, so its result does not depend on which other
   segments share its batch. A batch that runs out of GPU memory is halved and retried, and the
   smaller size is kept for later batches of that width.
3. `Refiner.assemble` joins segments with a normalised cross-fade and trims to the input length.

In the diffusers sense, `refiner.refine` is the scheduler-and-sampler, the UNet is the model and
`Refiner` is the pipeline around them.
"""

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .acceleration import (ExecutionSettings, build_runner, estimate_max_batch_frames, is_out_of_memory,
                           network_session, release_cached_memory)
from .audio.folders import check_output_file
from .audio.io import MODEL_SAMPLE_RATE, fit_length, resample, resampled_length, save_audio
from .checkpoints import ModelSettings, load_model
from .errors import UsageError, first_line
from .flags import affects_output, setting
from .methods import DEFAULT_METHOD, get_method, resolve_etas
from .refiner import refine
from .script_util import SAMPLING_RESPACING
from .seeding import derive_seed, torch_generator
from .spectrogram import HOP_LENGTH, MIN_SAMPLES, noise_map, num_frames, spec_to_wave, wave_to_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSettings:
    """Which reverse process runs (a name registered in `diffiner.methods`) and with which etas.

    `etas` may name some of the method's etas; the others take the method's defaults, and after
    construction `etas` holds them all.
    """

    method: str = DEFAULT_METHOD
    etas: Mapping[str, float] = dataclasses.field(default_factory=dict)
    clip_denoised: bool = setting(False, "clamp the predicted x0 to [-1, 1] at every step")

    def __post_init__(self):
        # Validates: an unknown method, an eta the method does not use, a value it cannot.
        object.__setattr__(self, "etas", resolve_etas(self.method, **dict(self.etas)))

    @property
    def folder_name(self) -> str:
        """The default output folder name of a run with these settings."""
        method = get_method(self.method)
        return method.folder_name(method.resolve_etas(self.etas))

    def describe(self) -> Dict[str, Any]:
        """The method, its etas and clip_denoised, as config.yml records them."""
        return {"method": self.method, **self.etas, "clip_denoised": self.clip_denoised}


@dataclass(frozen=True)
class SegmentSettings:
    """How long recordings are cut: windows of `max_dur` seconds overlapping by `segment_overlap`."""

    max_dur: float = setting(10.0, "longer files are refined in overlapping segments of this many seconds")
    segment_overlap: float = setting(1.0, "overlap between segments, seconds (cross-faded)")

    def __post_init__(self):
        if not (self.max_dur > 0 and 0 <= self.segment_overlap < self.max_dur):
            raise ValueError(f"need max_dur > segment_overlap >= 0, got {self.max_dur} and {self.segment_overlap}")


@dataclass(frozen=True)
class BatchSettings:
    """How segments are grouped: `batch_size` per batch, or a budget of `max_batch_frames`
    spectrogram frames per batch; widths are padded to `width_bucket` (default: the network's
    multiple, or 128 frames when compiled, so that a compiled network sees few shapes)."""

    batch_size: int = setting(8, "segments of equal width refined together", affects_output=False)
    max_batch_frames: Optional[int] = setting(None, "instead of batch_size: a budget of spectrogram frames per "
                                                    "batch (short files run in large batches, long ones in small)",
                                              affects_output=False)
    # The width sets the padding, hence the noise drawn: it changes the audio.
    width_bucket: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.max_batch_frames, (int, type(None))):  # e.g. the command line's "auto"
            raise ValueError(f"max_batch_frames takes a number of frames, got {self.max_batch_frames!r}; to size "
                             "batches from free GPU memory, call Refiner.auto_max_batch_frames(width)")
        if self.batch_size < 1 or (self.max_batch_frames is not None and self.max_batch_frames < 1):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} and {self.max_batch_frames}")


@dataclass(frozen=True)
class RefinerSettings:
    """Everything that shapes a Refiner's work, one group per concern."""

    method: MethodSettings = MethodSettings()
    segmenting: SegmentSettings = SegmentSettings()
    batching: BatchSettings = BatchSettings()
    execution: ExecutionSettings = ExecutionSettings()

    def describe(self, width_bucket: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(what shapes the output, how the run executes) as config.yml records them; the
        width bucket is the one in effect (`Refiner.width_bucket`)."""
        shaping = {**self.method.describe(), **dataclasses.asdict(self.segmenting), "width_bucket": width_bucket}
        execution = {}
        for group in (self.batching, self.execution):
            for name, value in dataclasses.asdict(group).items():
                if not affects_output(type(group), name):
                    execution[name] = value
        return shaping, execution

    @classmethod
    def from_flat(cls, **settings: Any) -> "RefinerSettings":
        """Settings from flat keywords (method=..., eta_a=..., max_dur=..., precision=...), each
        routed to the group that has it (the method's eta names to its etas); TypeError for a
        keyword no group has."""
        names = get_method(settings.get("method", DEFAULT_METHOD)).eta_names()
        etas = {k: settings.pop(k) for k in list(settings) if k in names}
        if etas:
            settings["etas"] = dict(settings.get("etas") or {}, **etas)
        groups = {}
        for field in dataclasses.fields(cls):
            names = {f.name for f in dataclasses.fields(field.type)}
            groups[field.name] = field.type(**{k: settings.pop(k) for k in list(settings) if k in names})
        if settings:
            raise TypeError(f"unknown refiner settings: {sorted(settings)}")
        return cls(**groups)


@dataclass
class Segment:
    """One mono window of one recording, ready for the network."""

    noisy: torch.Tensor  # (2, 256, width) spectrogram of the noisy window followed by silence
    noise_map: torch.Tensor  # (1, 256, width)
    samples: int  # length of the window in samples (16 kHz; at least MIN_SAMPLES)
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
    samples: int  # length at 16 kHz (the windows cover max(samples, MIN_SAMPLES): short ones are padded)
    sample_rate: int  # the caller's sample rate
    input_samples: int  # length at the caller's sample rate


def segment_seed(seed: int, key: str, channel: int, index: int) -> int:
    """A seed that depends only on the run's seed and the segment's identity (recording key,
    channel, window number)."""
    return derive_seed(seed, key, channel, index)


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
    width is that of one window; shorter than MIN_SAMPLES, they are padded to it. The width holds
    at least one frame past the signal's frames, padded up to the network's `multiple`. Why: the
    signal's last partial hop (up to 255 samples) lies under the last frame's window alone, where
    the squared window that normalises the overlap-add falls to zero, so inverting only the
    signal's frames divides any inconsistency of the generated spectrogram by a near-zero weight:
    a click at the end of the file. With the next frame refined and inverted too, every kept
    sample has an overlap-add weight of at least 1/2.
    """
    frames = num_frames(min(max(samples, MIN_SAMPLES), max_samples)) + 1
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


class Refiner:
    """A loaded model plus refinement settings: refines pairs of recordings.

    Example::

        from diffiner import Refiner
        refiner = Refiner.from_checkpoint("pretrained_diffiner_onVB.pt")
        refiner.refine_file("noisy.wav", "enhanced.wav", "refined.wav")
        refined = refiner.refine(noisy, processed, sample_rate=16000)  # arrays, in the caller's layout

    Settings come as a `RefinerSettings`, or as flat keywords (`method="diffiner"`,
    `eta_a=0.5`, `precision="bf16"`, ...), the names of the command-line flags.
    """

    def __init__(self, model: torch.nn.Module, diffusion, settings: Optional[RefinerSettings] = None, *,
                 device=None, **flat_settings: Any):
        if flat_settings and settings is not None:
            raise TypeError("give settings as a RefinerSettings or as keywords, not both")
        settings = settings or RefinerSettings.from_flat(**flat_settings)
        self.etas = settings.method.etas
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # "auto" precision and layout become the device's (config.yml records what runs).
        self.settings = dataclasses.replace(settings, execution=settings.execution.resolved(self.device))
        self.model = model.to(self.device).eval()
        self.network = build_runner(self.model, self.settings.execution)
        self.diffusion = diffusion
        segmenting, batching = self.settings.segmenting, self.settings.batching
        self.max_samples = int(round(segmenting.max_dur * MODEL_SAMPLE_RATE))
        self.overlap_samples = int(round(segmenting.segment_overlap * MODEL_SAMPLE_RATE))
        # The batch sizing can change after construction (auto_max_batch_frames).
        self.batch_size = batching.batch_size
        self.max_batch_frames = batching.max_batch_frames
        self.multiple = getattr(model, "downsample_factor", 1)
        self.width_bucket = batching.width_bucket or (128 if self.settings.execution.compiled else self.multiple)
        if self.width_bucket % self.multiple:
            raise ValueError(f"width_bucket {self.width_bucket} must be a multiple of {self.multiple}")
        # Segments per batch known to fit in GPU memory, per width: learned from out-of-memory
        # errors (see _run_fitting), and kept for the rest of the Refiner's life.
        self.fitting_batch: Dict[int, int] = {}

    @property
    def method(self) -> str:
        return self.settings.method.method

    @property
    def precision(self) -> str:
        return self.settings.execution.precision

    @classmethod
    def from_checkpoint(cls, model_path: str, *, device=None, timestep_respacing: str = SAMPLING_RESPACING,
                        model_settings: Union[None, Dict[str, Any], ModelSettings] = None, **settings: Any
                        ) -> "Refiner":
        """Load the checkpoint at `model_path` with the settings it carries (its folder's
        model_config.yml; without one, the published configuration), each overridden by
        `model_settings`, and wrap it with the given refinement settings (a
        `settings=RefinerSettings(...)` or flat keywords). The sampler takes the
        `timestep_respacing` steps (default: the published ddim200).
        """
        if isinstance(model_settings, dict) and "timestep_respacing" in model_settings:
            raise ValueError("timestep_respacing is a sampler setting, not a model setting: pass "
                             "from_checkpoint(..., timestep_respacing=...)")
        model, diffusion = load_model(model_path, model_settings, timestep_respacing=timestep_respacing)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, diffusion, device=device, **settings)

    def padded_width(self, samples: int) -> int:
        """Width of the segments of a recording of `samples` samples at 16 kHz."""
        return padded_width(samples, self.width_bucket, self.max_samples)

    def batch_size_for(self, width: int) -> int:
        """Segments per batch at `width`: from the frame budget when set, else `batch_size`, and
        never more than an out-of-memory error has shown to fit at that width."""
        size = max(1, self.max_batch_frames // width) if self.max_batch_frames else self.batch_size
        return min(size, self.fitting_batch.get(width, size))

    def auto_max_batch_frames(self, width: int) -> None:
        """Set the frame budget from the free GPU memory, measured at the widest `width`.

        Keeps `batch_size` when there is no GPU or the measurement fails.
        """
        try:
            self.max_batch_frames = estimate_max_batch_frames(self.network, self.model, self.device, width)
        except RuntimeError as exc:
            logger.warning("could not size batches from GPU memory (%s); using batch_size %d",
                           first_line(exc), self.batch_size)
            if is_out_of_memory(exc):
                release_cached_memory(self.device)

    # ----- the three stages -----
    def prepare(self, noisy: np.ndarray, processed: np.ndarray, sample_rate: int, seed: int = 0,
                key: str = "") -> Prepared:
        """Resample to 16 kHz, split into channels and windows, and compute the spectrograms.

        `noisy` and `processed` are (samples,) or (channels, samples) at `sample_rate` (integer
        samples are scaled by their type); a mono side is shared with every channel of the other.
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
        # The centred STFT reflects 256 samples at each end, which needs more than 256: shorter
        # recordings are refined as if followed by silence, and `assemble` trims it away.
        covered = max(samples, MIN_SAMPLES)
        noisy16, processed16 = fit_length(noisy16, covered), fit_length(processed16, covered)
        bounds = segment_bounds(covered, self.max_samples, self.overlap_samples)
        segments = []
        for channel in range(channels):
            y_wave = torch.from_numpy(noisy16[min(channel, noisy16.shape[0] - 1)])
            p_wave = torch.from_numpy(processed16[min(channel, processed16.shape[0] - 1)])
            for index, (start, end) in enumerate(bounds):
                # Silence after the window, up to the shortest length whose STFT has the network's
                # width: the frames past the signal are those of a signal that ends, so inverting
                # them all gives the window back (see padded_width).
                pad = (0, (self.padded_width(end - start) - 1) * HOP_LENGTH - (end - start))
                y_spec = wave_to_spec(torch.nn.functional.pad(y_wave[start:end], pad))
                sigma = noise_map(y_spec, wave_to_spec(torch.nn.functional.pad(p_wave[start:end], pad)))
                segments.append(Segment(noisy=y_spec, noise_map=sigma, samples=end - start,
                                        seed=segment_seed(seed, key, channel, index)))
        return Prepared(segments, bounds, channels, samples, sample_rate, input_samples)

    def run_segments(self, segments: Sequence[Segment], progress: bool = False) -> List[torch.Tensor]:
        """Refine segments (any widths) and return their waveforms at 16 kHz, in order.

        The segments of each width go through `refine_stream` together, so they are batched and
        recovered from running out of GPU memory as a folder's are; raises SegmentTooLarge when a
        single segment does not fit.
        """
        by_width: Dict[int, List[int]] = {}
        for i, seg in enumerate(segments):
            by_width.setdefault(seg.width, []).append(i)
        results: List[Optional[torch.Tensor]] = [None] * len(segments)
        groups = ((indices, [segments[i] for i in indices]) for indices in by_width.values())
        for done in self.refine_stream(groups, progress=progress):
            if done.error is not None:
                raise done.error
            for i, wave in zip(done.item, done.waves):
                results[i] = wave
        return results

    def _run_fitting(self, batch: Sequence[Segment], progress: bool = False
                     ) -> Iterator[Tuple[int, Union[torch.Tensor, "SegmentTooLarge"]]]:
        """Refine segments of equal width, halving the batch on CUDA out-of-memory errors.

        Yields (index in `batch`, waveform) as parts finish, or (index, SegmentTooLarge) for a
        segment that does not fit even alone. A smaller size that fits is remembered for the
        width (`fitting_batch`), so later batches start there; each segment keeps its own
        generator, so the results equal those of a run that never ran out of memory.
        """
        width = batch[0].width
        parts = [list(range(len(batch)))]
        while parts:
            part = parts.pop(0)
            fits = self.fitting_batch.get(width, len(part))
            if len(part) > fits:
                parts[:0] = [part[lo:lo + fits] for lo in range(0, len(part), fits)]
                continue
            try:
                waves = self.run_batch([batch[k] for k in part], progress)
            except Exception as exc:  # torch raises its out-of-memory errors as several types
                if not is_out_of_memory(exc):
                    raise
                failure = first_line(exc)
            else:
                yield from zip(part, waves)
                continue
            # Outside the except clause: the error's traceback, and with it the failed attempt's
            # tensors, is gone before the cached memory is released and the retry allocates.
            release_cached_memory(self.device)
            if len(part) == 1:
                yield part[0], SegmentTooLarge(
                    f"a segment of {batch[part[0]].samples / MODEL_SAMPLE_RATE:.1f} s ({width} frames) does not "
                    f"fit in {self.device} memory even alone ({failure}); a shorter --max-dur cuts recordings "
                    f"into shorter segments")
                continue
            half = (len(part) + 1) // 2
            if width in self.fitting_batch:
                logger.debug("out of memory again at %d frames: batches of %d", width, half)
            else:
                logger.warning("out of %s memory refining %d segments of %d frames: retrying in batches of %d, "
                               "and no more than that at this width from now on", self.device, len(part), width, half)
            self.fitting_batch[width] = half
            parts.insert(0, part)  # split by the new size on the next round

    def run_batch(self, batch: Sequence[Segment], progress: bool = False) -> List[torch.Tensor]:
        """Refine segments of equal width in one batch; returns 16 kHz waveforms on the CPU.

        Every frame is inverted, the padding past the signal included (see `padded_width`), and
        the waveform is then trimmed to the segment's length.
        """
        noisy = torch.stack([seg.noisy for seg in batch]).to(self.device)
        sigma = torch.stack([seg.noise_map for seg in batch]).to(self.device)
        generators = [torch_generator(seg.seed, self.device) for seg in batch]
        method = self.settings.method
        with network_session(self.network):  # autocast entered once for the whole reverse process
            spec = refine(
                self.network, self.diffusion, noisy, sigma, method=method.method, clip_denoised=method.clip_denoised,
                generator=generators, progress=progress, **self.etas,
            )
        spec = spec.float().cpu()
        return [spec_to_wave(spec[k], seg.samples) for k, seg in enumerate(batch)]

    def refine_stream(self, recordings: Iterable[Tuple[Any, Sequence[Segment]]], progress: bool = False
                      ) -> Iterator["Refined"]:
        """Refine recordings as they arrive, each given as (item, its segments, all of one width);
        yield a `Refined` for each one as soon as all its segments are done (or as soon as it has
        failed). The one batch runner: the folder command and the Python API both refine here.

        Segments of consecutive recordings of equal width share batches (of `batch_size_for` that
        width), so recordings sorted by width fill the batches; a batch runs as soon as it
        is full, so only a batch's worth of segments waits in memory. A recording with a segment
        that does not fit in GPU memory even alone fails alone (its `error` is a SegmentTooLarge);
        the others go on. `progress` shows each batch's reverse steps.
        """
        pending: List[Tuple[_InProgress, int]] = []  # (recording, segment index), all of one width
        for item, segments in recordings:
            entry = _InProgress(item, list(segments))
            if pending and pending[0][0].width != entry.width:
                yield from self._run_pending(pending, flush=True, progress=progress)
            pending.extend((entry, i) for i in range(len(entry.segments)))
            yield from self._run_pending(pending, flush=False, progress=progress)
        yield from self._run_pending(pending, flush=True, progress=progress)

    def _run_pending(self, pending: List[Tuple["_InProgress", int]], flush: bool, progress: bool = False
                     ) -> Iterator["Refined"]:
        """Run the full batches of `pending` (every batch with `flush`) and drop them from it."""
        while True:
            pending[:] = [(entry, i) for entry, i in pending if not entry.failed]
            if not pending:
                return
            size = self.batch_size_for(pending[0][0].width)  # one width (refine_stream)
            if not flush and len(pending) < size:
                return  # wait for more segments of this width
            batch = pending[:size]
            for k, wave in self._run_fitting([entry.segments[i] for entry, i in batch], progress):
                entry, i = batch[k]
                if entry.failed:
                    continue
                if isinstance(wave, SegmentTooLarge):
                    entry.failed = True
                    yield Refined(entry.item, None, wave)
                    continue
                entry.waves[i] = wave
                entry.remaining -= 1
                if entry.remaining == 0:
                    yield Refined(entry.item, entry.waves)
            del pending[:len(batch)]

    def assemble(self, prepared: Prepared, waves: Sequence[torch.Tensor],
                 output_sample_rate: Optional[int] = None) -> np.ndarray:
        """Join refined windows into (channels, samples) at `output_sample_rate` (16 kHz if None).

        At the caller's own sample rate the output has exactly the input's sample count.
        """
        per_channel = len(prepared.bounds)
        covered = prepared.bounds[-1][1]  # more than prepared.samples when a short recording was padded
        joined = np.stack([
            crossfade_join([w.numpy() for w in waves[c * per_channel:(c + 1) * per_channel]],
                           prepared.bounds, covered, self.overlap_samples)
            for c in range(prepared.channels)
        ])
        rate = output_sample_rate or MODEL_SAMPLE_RATE
        if rate == prepared.sample_rate:
            length = prepared.input_samples
        else:
            # At least one sample: a 1-sample file at 48 kHz is 0 samples long at 16 kHz, and an
            # empty output would pass for a refined file.
            length = max(1, resampled_length(prepared.samples, MODEL_SAMPLE_RATE, rate))
        # Resampled before trimming: the padding of a short recording gives the resampler its
        # context, and the trim then gives exactly the input's duration.
        return resample(joined, MODEL_SAMPLE_RATE, rate, length=length)

    # ----- the Python API -----
    def refine(self, noisy: np.ndarray, processed: np.ndarray, sample_rate: int, *, seed: int = 0,
               key: str = "", output_sample_rate: Optional[int] = None, progress: bool = False,
               layout: Optional[str] = None) -> np.ndarray:
        """Refine one recording pair; returns float32 audio in [-1, 1] shaped like `processed`.

        A 1-D array is mono. A 2-D array is (channels, samples) by default (`layout=
        "channels_first"`), or (frames, channels) as `soundfile.read` returns it (`layout=
        "channels_last"`). With `layout` None the layout is read from the shapes, and only where
        they tell it apart: one axis of at most MAX_CHANNELS and the other longer; any other shape
        is refused with an ArrayError (a ValueError) saying to pass `layout`; so is a `layout` that
        the shape contradicts (many channels of at most MAX_CHANNELS samples). The result comes
        back in the caller's layout. Integer arrays (int16, int32, ...) are scaled by their type to [-1, 1).

        The output is at `output_sample_rate`, by default the input's `sample_rate`, with the
        same duration (and at least one sample). `key` names the recording in the seed (the CLI
        uses its relative path).
        """
        channels_last = _channels_last(noisy, processed, layout)
        if channels_last:
            noisy, processed = np.transpose(noisy), np.transpose(processed)
        prepared = self.prepare(noisy, processed, sample_rate, seed=seed, key=key)
        waves = self.run_segments(prepared.segments, progress=progress)
        out = self.assemble(prepared, waves, output_sample_rate or sample_rate)
        if np.ndim(processed) == 1 and np.ndim(noisy) == 1:
            return out[0]
        return np.ascontiguousarray(out.T) if channels_last else out

    def refine_file(self, noisy_path: str, processed_path: str, output_path: str, *, seed: int = 0,
                    output_sample_rate: Optional[int] = None, progress: bool = False) -> None:
        """Refine one pair of audio files (any sample rate and channel count) into `output_path`.

        The files are read and written as `diffiner-refine` reads and writes them: the noisy file
        is brought to the processed file's rate and length (refused when the lengths differ by
        more than corpus.LENGTH_TOLERANCE_S), the seed's key is the processed file's name, and the
        output is 16-bit PCM (WAV, or FLAC by its extension) at `output_sample_rate` (default: the
        processed file's), written atomically: a failure or an interruption leaves no file or the
        earlier one. Raises FolderError when `output_path` is one of the inputs (by any link),
        AudioError naming the file that cannot be read or a result that is not finite.
        """
        # Imported here: corpus builds on this module.
        from .corpus import load_pair

        check_output_file({"noisy": noisy_path, "processed": processed_path}, output_path)
        noisy, processed, rate = load_pair(noisy_path, processed_path)
        refined = self.refine(noisy, processed, rate, seed=seed, key=os.path.basename(processed_path),
                              output_sample_rate=output_sample_rate or rate, progress=progress,
                              layout="channels_first")
        save_audio(output_path, refined, output_sample_rate or rate)


class SegmentTooLarge(RuntimeError):
    """A single segment does not fit in GPU memory: its recording cannot be refined as set up."""


@dataclass
class Refined:
    """One recording out of `Refiner.refine_stream`: its waves (16 kHz, one per segment), or the
    error that stopped it (then `waves` is None)."""

    item: Any
    waves: Optional[List[torch.Tensor]]
    error: Optional[Exception] = None


@dataclass
class _InProgress:
    """A recording whose segments are being refined."""

    item: Any
    segments: List[Segment]

    def __post_init__(self):
        self.waves: List[Optional[torch.Tensor]] = [None] * len(self.segments)
        self.remaining = len(self.waves)
        self.failed = False

    @property
    def width(self) -> int:
        return self.segments[0].width


class ArrayError(UsageError, ValueError):
    """An array the Python API cannot take as audio (its shape, layout, dtype or values); one line
    that says how to pass it. A ValueError, as numpy's own complaints about arrays are."""


# Layouts of a 2-D array: (channels, samples), the default, or (frames, channels) as soundfile reads.
LAYOUTS = ("channels_first", "channels_last")
# The most channels a layout is inferred for: more than any recording setup the refiner is for
# (7.1 surround has 8), and far fewer than the samples of any recording worth refining, so a 2-D
# shape with exactly one axis this short tells its layout apart.
MAX_CHANNELS = 8


def _channels_last(noisy: Any, processed: Any, layout: Optional[str]) -> bool:
    """Whether the 2-D arrays among `noisy` and `processed` are (frames, channels): `layout` as
    given, else read from their shapes (see `Refiner.refine`); ValueError in one line, saying how
    to pass them, where the shapes do not tell it or the two arrays disagree."""
    if layout is not None and layout not in LAYOUTS:
        raise ArrayError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    found = {}
    for name, audio in (("noisy", noisy), ("processed", processed)):
        shape = np.shape(audio)
        if len(shape) != 2:
            continue  # a mono array has no layout; another rank is refused by prepare
        fits = [shape[0] <= MAX_CHANNELS, shape[1] <= MAX_CHANNELS]
        if layout is not None:
            # Taken as given, except where the shape says the opposite: (22400, 2) as
            # channels_first is 22400 channels of 2 samples, a run of hours on nothing.
            channel_axis = LAYOUTS.index(layout)
            if not fits[channel_axis] and fits[1 - channel_axis]:
                raise ArrayError(f"{name} has shape {shape}: as layout={layout!r} that is {shape[channel_axis]} "
                                 f"channels of {shape[1 - channel_axis]} samples; pass "
                                 f"layout={LAYOUTS[1 - channel_axis]!r} (or nothing)")
            continue
        if fits[0] == fits[1]:
            raise ArrayError(
                f"{name} has shape {shape}, which does not say which axis holds the channels (the layout is "
                f"read from the shape only when one axis has at most {MAX_CHANNELS} entries and the other more); "
                "pass layout='channels_first' for (channels, samples) or layout='channels_last' for "
                "(frames, channels) as soundfile.read returns it")
        found[name] = fits[1]
    if layout is not None:
        return layout == "channels_last"
    if len(set(found.values())) > 1:
        raise ArrayError(f"noisy is {LAYOUTS[found['noisy']]} {np.shape(noisy)} but processed is "
                         f"{LAYOUTS[found['processed']]} {np.shape(processed)}; pass both in one layout")
    return any(found.values())


def _as_2d(audio: np.ndarray, name: str) -> np.ndarray:
    """`audio` as finite float32 (channels, samples); integer samples scaled by their type."""
    arr = np.asarray(audio)
    if arr.dtype.kind == "u":
        # Unsigned PCM (8-bit WAV) is offset, not only scaled: no rule here would be a guess.
        raise ArrayError(f"{name} has unsigned integer samples ({arr.dtype}); convert them to float in [-1, 1] "
                         "or to signed integers first")
    if arr.dtype.kind == "i":
        # Full scale of a signed integer type is 2**(bits - 1), as soundfile reads PCM; taken as
        # they are, int16 samples of about 1e4 would be refined as if 80 dB too loud.
        arr = arr.astype(np.float64) / 2.0 ** (8 * arr.dtype.itemsize - 1)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] == 0:
        raise ArrayError(f"{name} must be non-empty (samples,) or (channels, samples), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ArrayError(f"{name} contains NaN or infinite samples")
    return arr
