"""Refining recordings: from (noisy, processed) waveforms to refined waveforms.

This is the one code path shared by the Python API, the folder command and the benchmarks:

1. `Refiner.prepare` turns a pair of recordings into segments at the model's sample rate (its
   front-end, `spectrogram.FrontEnd`): per channel, and for long recordings overlapping windows
   of at most `max_dur` seconds; each window is followed by silence only up to the network's
   multiple of frames (32 for the published model), keeping at least one frame past the signal
   (see `padded_width`). Recordings shorter than the STFT allows are zero-padded first
   (`FrontEnd.min_samples`).
2. `Refiner.refine_segments`, the one batch runner, groups the segments of recordings that
   arrive one by one (a folder, or `run_segments`' list) into batches of equal width, taking
   each recording's segments only as batches need them, and `Refiner.run_batch` refines one
   batch. Every segment has its own random generator, seeded from the seed and the segment's
   identity, so its result does not depend on which other segments share its batch (up to the
   last bits). A batch that runs out of GPU memory is halved and retried, and the smaller size is
   kept for later batches of that width. A batch that meets another error of the GPU (a failed
   kernel, cuDNN, cuBLAS) is retried one segment at a time, and a segment that fails alone too
   fails its recording only. `refine_stream` gathers each recording's results.
3. `Refiner.assemble` joins segments with a normalised cross-fade and trims to the input length;
   above the model's rate it adds the processed input's band above the model's (`--high-band`).

A recording of any length can also go through as a stream, with the same samples
(`stream_segments` cuts segments from blocks of 16 kHz audio, `stream_output` joins refined
segments into blocks at the output rate as soon as no later segment overlaps them): the folder
command refines every file so, and holds a few segments per file, never a whole long file.

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

from .acceleration import (ExecutionSettings, build_runner, estimate_max_batch_frames, is_device_error,
                           is_out_of_memory, network_session, release_cached_memory)
from .audio import crossover
from .audio.folders import check_output_file
from .audio.io import fit_length, resample, resample_stream, resampled_length, save_audio
from .checkpoints import ModelSettings, load_model
from .errors import UsageError, first_line
from .flags import affects_output, setting
from .methods import DEFAULT_METHOD, get_method, resolve_etas
from .pretrained import PUBLISHED_NAME, fetch_published
from .refiner import refine
from .script_util import SAMPLING_RESPACING
from .seeding import derive_seed, torch_generator
from .spectrogram import PUBLISHED, FrontEnd, front_end_of, noise_map, num_frames, spec_to_wave, wave_to_spec

logger = logging.getLogger(__name__)

# Multichannel recordings up to this long are cut channel by channel (see Layout.channel_major);
# holding one costs about 200 kB per second and extra channel.
CHANNEL_MAJOR_MAX_SECONDS = 600.0


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
class OutputSettings:
    """What the output holds above the model's band, when it is written at a higher rate."""

    high_band: str = setting("processed", "above the model's band, when the output rate and the processed input's "
                                          "are higher than the model's: the processed file's content, joined by "
                                          "a linear-phase crossover (processed), or nothing (none)",
                             choices=crossover.HIGH_BAND_CHOICES)

    def __post_init__(self):
        if self.high_band not in crossover.HIGH_BAND_CHOICES:
            raise ValueError(f"high_band must be one of {', '.join(crossover.HIGH_BAND_CHOICES)}, "
                             f"got {self.high_band!r}")


@dataclass(frozen=True)
class RefinerSettings:
    """Everything that shapes a Refiner's work, one group per concern."""

    method: MethodSettings = MethodSettings()
    segmenting: SegmentSettings = SegmentSettings()
    batching: BatchSettings = BatchSettings()
    execution: ExecutionSettings = ExecutionSettings()
    output: OutputSettings = OutputSettings()

    def describe(self, width_bucket: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(what shapes the output, how the run executes) as config.yml records them; the
        width bucket is the one in effect (`Refiner.width_bucket`)."""
        shaping = {**self.method.describe(), **dataclasses.asdict(self.segmenting), "width_bucket": width_bucket,
                   **dataclasses.asdict(self.output)}
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

    noisy: torch.Tensor  # (2, bins, width) spectrogram of the noisy window followed by silence
    noise_map: torch.Tensor  # (1, bins, width)
    samples: int  # length of the window in samples (at the model's rate; at least its min_samples)
    seed: int  # seed of this segment's generator

    @property
    def width(self) -> int:
        return self.noisy.shape[-1]


@dataclass
class Layout:
    """How a recording is cut into segments and put back together."""

    bounds: List[Tuple[int, int]]  # (start, end) sample of each window, the same for every channel
    channels: int
    samples: int  # length at the model's rate (the windows cover max(samples, min_samples): short ones are padded)
    sample_rate: int  # the caller's sample rate
    input_samples: int  # length at the caller's sample rate
    model_rate: int  # the model's sample rate, that of `samples` and `bounds`

    @property
    def segments_count(self) -> int:
        return self.channels * len(self.bounds)

    @property
    def channel_major(self) -> bool:
        """Whether the segments go channel by channel (else window by window; for one channel,
        or one window, the two orders are the same). Recordings up to CHANNEL_MAJOR_MAX_SECONDS
        keep the order in which segments were always batched, since a batch's other segments
        change a result in its last bits; longer ones go window by window, so that the memory
        held does not grow with their length."""
        return self.samples <= CHANNEL_MAJOR_MAX_SECONDS * self.model_rate

    def output_length(self, rate: int) -> int:
        """Samples of the refined recording at `rate`: at the caller's own rate exactly the
        input's count; at another, the length at the model's rate resampled, and at least one sample (a
        1-sample file at 48 kHz is 0 samples long at 16 kHz, and an empty output would pass for a
        refined file)."""
        if rate == self.sample_rate:
            return self.input_samples
        return max(1, resampled_length(self.samples, self.model_rate, rate))


@dataclass
class Prepared(Layout):
    """A recording split into segments (channel by channel, each in time order), with what is
    needed to put it back together."""

    segments: List[Segment] = dataclasses.field(default_factory=list)
    processed: Optional[np.ndarray] = None  # (channels or 1, input_samples) at the caller's rate: the high band's source


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


def padded_width(samples: int, multiple: int, max_samples: int, front_end: FrontEnd = PUBLISHED) -> int:
    """Spectrogram width the network sees for a recording of `samples` (at the front-end's rate).

    Recordings longer than `max_samples` are cut into windows of exactly `max_samples`, so their
    width is that of one window; shorter than the front-end's min_samples, they are padded to it.
    The width holds at least one frame past the signal's frames, padded up to the network's
    `multiple`. Why: the signal's last partial hop (up to hop - 1 samples) lies under the last
    frame's window alone, where
    the squared window that normalises the overlap-add falls to zero, so inverting only the
    signal's frames divides any inconsistency of the generated spectrogram by a near-zero weight:
    a click at the end of the file. With the next frame refined and inverted too, every kept
    sample has an overlap-add weight of at least 1/2.
    """
    frames = num_frames(min(max(samples, front_end.min_samples), max_samples), front_end) + 1
    return multiple * math.ceil(frames / multiple)


def crossfade_join(chunks: Sequence[np.ndarray], bounds: Sequence[Tuple[int, int]], samples: int,
                   overlap: int) -> np.ndarray:
    """Overlap-add windows with linear fades over `overlap` samples, normalised by the weights;
    the windows cover `samples` exactly (see `CrossfadeJoiner`)."""
    if bounds[0][0] != 0 or bounds[-1][1] != samples:
        raise ValueError(f"windows {bounds[0]} ... {bounds[-1]} do not cover {samples} samples")
    joiner = CrossfadeJoiner(bounds, overlap)
    return np.concatenate([joiner.add(np.asarray(chunk)[None])[0] for chunk in chunks])


class CrossfadeJoiner:
    """`crossfade_join` as a stream: windows (channels, samples) go in in order, and each `add`
    returns the samples that no later window overlaps, joined: the same values, so the memory it
    holds is one window's, however many windows there are.

    Each sample is the sum of weight * window over the windows that cover it, in window order
    from zero, divided by the sum of the weights (float64, then float32); a single window comes
    back as it is.
    """

    def __init__(self, bounds: Sequence[Tuple[int, int]], overlap: int):
        self.bounds = list(bounds)
        self.overlap = overlap
        self.ramp = (np.arange(overlap) + 0.5) / max(overlap, 1)
        self.index = 0
        self.offset = 0  # the first sample not yet returned; `out` and `total` start there
        self.out = np.zeros((0, 0), dtype=np.float64)
        self.total = np.zeros(0, dtype=np.float64)

    def add(self, chunk: np.ndarray) -> np.ndarray:
        """Take the next window (channels, end - start); return the finished samples (channels, n)."""
        k, (start, end) = self.index, self.bounds[self.index]
        self.index += 1
        last = self.index == len(self.bounds)
        if len(self.bounds) == 1:
            return chunk
        weight = np.ones(end - start)
        if k > 0 and self.overlap:
            weight[:self.overlap] = self.ramp
        if not last and self.overlap:
            weight[-self.overlap:] = np.minimum(weight[-self.overlap:], self.ramp[::-1])
        grow = end - self.offset - self.total.shape[0]
        if grow > 0:
            self.out = np.concatenate([self.out.reshape(chunk.shape[0], -1),
                                       np.zeros((chunk.shape[0], grow))], axis=1)
            self.total = np.concatenate([self.total, np.zeros(grow)])
        self.out[:, start - self.offset:end - self.offset] += weight * chunk
        self.total[start - self.offset:end - self.offset] += weight
        done = (end if last else self.bounds[self.index][0]) - self.offset
        joined = (self.out[:, :done] / self.total[:done]).astype(np.float32)
        self.out, self.total = self.out[:, done:], self.total[done:]
        self.offset += done
        return joined


def sliding_windows(blocks: Iterable[np.ndarray], bounds: Sequence[Tuple[int, int]]) -> Iterator[np.ndarray]:
    """The (channels, end - start) windows `bounds` (starts and ends increasing) of the signal
    that `blocks` (channels, n) make up, holding no more of it than a window and a block."""
    blocks = iter(blocks)
    buffer: Optional[np.ndarray] = None
    offset = 0  # the sample at buffer[:, 0]
    for start, end in bounds:
        if buffer is not None:
            buffer, offset = buffer[:, start - offset:], start
        while buffer is None or offset + buffer.shape[1] < end:
            block = next(blocks)
            buffer = block if buffer is None else np.concatenate([buffer, block], axis=1)
        yield np.ascontiguousarray(buffer[:, start - offset:end - offset])


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
        self.front_end = front_end_of(model)
        self.sample_rate = self.front_end.sample_rate
        settings = settings or RefinerSettings.from_flat(**flat_settings)
        self.etas = settings.method.etas
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # "auto" precision and layout become the device's (config.yml records what runs).
        self.settings = dataclasses.replace(settings, execution=settings.execution.resolved(self.device))
        self.model = model.to(self.device).eval()
        self.network = build_runner(self.model, self.settings.execution)
        self.diffusion = diffusion
        segmenting, batching = self.settings.segmenting, self.settings.batching
        self.max_samples = int(round(segmenting.max_dur * self.sample_rate))
        self.overlap_samples = int(round(segmenting.segment_overlap * self.sample_rate))
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

    @classmethod
    def from_pretrained(cls, name: str = PUBLISHED_NAME, *, progress: bool = True, **kwargs: Any) -> "Refiner":
        """The Refiner of published weights by name: `"published"` (the one name), the authors'
        VoiceBank+DEMAND checkpoint, downloaded on first use with a progress bar (off with
        `progress=False`) into a per-user cache ($DIFFINER_CACHE, else $XDG_CACHE_HOME/diffiner,
        else ~/.cache/diffiner) and checked before it is kept; see `diffiner.pretrained`. The
        keywords are those of `from_checkpoint`. Raises ValueError for another name, and
        `diffiner.download.DownloadError` (an OSError) when the download fails, saying where to
        put the file by hand.
        """
        if name != PUBLISHED_NAME:
            raise ValueError(f"no published weights named {name!r}: the name is {PUBLISHED_NAME!r} "
                             "(a checkpoint file: Refiner.from_checkpoint)")
        return cls.from_checkpoint(fetch_published(progress=progress), **kwargs)

    def padded_width(self, samples: int) -> int:
        """Width of the segments of a recording of `samples` samples at the model's rate."""
        return padded_width(samples, self.width_bucket, self.max_samples, self.front_end)

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
        """Resample to the model's rate, split into channels and windows, and compute the spectrograms.

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
        noisy16 = resample(noisy2d, sample_rate, self.sample_rate)
        processed16 = resample(processed2d, sample_rate, self.sample_rate)
        samples = noisy16.shape[-1]
        # The centred STFT reflects n_fft / 2 samples at each end, which needs more than that:
        # shorter recordings are refined as if followed by silence, and `assemble` trims it away.
        covered = max(samples, self.front_end.min_samples)
        noisy16, processed16 = fit_length(noisy16, covered), fit_length(processed16, covered)
        layout = self.layout(samples, channels, sample_rate, input_samples)
        segments = []
        for channel in range(channels):
            y_wave = torch.from_numpy(noisy16[min(channel, noisy16.shape[0] - 1)])
            p_wave = torch.from_numpy(processed16[min(channel, processed16.shape[0] - 1)])
            for index, (start, end) in enumerate(layout.bounds):
                segments.append(self._segment(y_wave[start:end], p_wave[start:end],
                                              segment_seed(seed, key, channel, index)))
        return Prepared(**vars(layout), segments=segments, processed=processed2d)

    def layout(self, samples: int, channels: int, sample_rate: int, input_samples: int) -> Layout:
        """The windows of a recording of `samples` at the model's rate (`input_samples` at `sample_rate`)."""
        # The centred STFT reflects n_fft / 2 samples at each end, which needs more than that:
        # shorter recordings are refined as if followed by silence, and the output is trimmed.
        bounds = segment_bounds(max(samples, self.front_end.min_samples), self.max_samples, self.overlap_samples)
        return Layout(bounds, channels, samples, sample_rate, input_samples, self.sample_rate)

    def _segment(self, noisy: torch.Tensor, processed: torch.Tensor, seed: int) -> Segment:
        """The segment of one mono window of the noisy and processed signals (at the model's rate)."""
        samples = noisy.shape[-1]
        # Silence after the window, up to the shortest length whose STFT has the network's
        # width: the frames past the signal are those of a signal that ends, so inverting
        # them all gives the window back (see padded_width).
        pad = (0, (self.padded_width(samples) - 1) * self.front_end.hop_length - samples)
        y_spec = wave_to_spec(torch.nn.functional.pad(noisy, pad), self.front_end)
        sigma = noise_map(y_spec, wave_to_spec(torch.nn.functional.pad(processed, pad), self.front_end))
        return Segment(noisy=y_spec, noise_map=sigma, samples=samples, seed=seed)

    # ----- streams: a recording of any length in the memory of a few windows -----
    def stream_segments(self, layout: Layout, noisy: Iterable[np.ndarray], processed: Iterable[np.ndarray], *,
                        seed: int = 0, key: str = "") -> Iterator[Segment]:
        """The segments of a recording given as blocks at the model's rate (channels, n) that make up exactly
        `layout.bounds[-1][1]` samples (noisy or processed may be mono, shared by every channel),
        each made as `prepare` makes it, in `prepare`'s order (channel by channel) where
        `layout.channel_major`, else window by window. Only the windows being cut are held (all
        of them for a multichannel recording cut channel by channel)."""
        windows: Iterable[Tuple[np.ndarray, np.ndarray]] = zip(sliding_windows(noisy, layout.bounds),
                                                               sliding_windows(processed, layout.bounds))

        def segment(y: np.ndarray, p: np.ndarray, channel: int, index: int) -> Segment:
            return self._segment(torch.from_numpy(y[min(channel, y.shape[0] - 1)]),
                                 torch.from_numpy(p[min(channel, p.shape[0] - 1)]),
                                 segment_seed(seed, key, channel, index))

        if layout.channel_major and layout.channels > 1:
            windows = list(windows)
            for channel in range(layout.channels):
                for index, (y, p) in enumerate(windows):
                    yield segment(y, p, channel, index)
            return
        for index, (y, p) in enumerate(windows):
            for channel in range(layout.channels):
                yield segment(y, p, channel, index)

    def stream_output(self, layout: Layout, waves: Iterable[torch.Tensor], rate: int) -> Iterator[np.ndarray]:
        """The refined recording at `rate`, as (channels, n) float32 blocks, from the waves of its
        segments in `stream_segments`' order: the samples `assemble` returns, exactly
        `layout.output_length(rate)` of them, each block as soon as no later segment changes it."""
        joiner = CrossfadeJoiner(layout.bounds, self.overlap_samples)
        joined = (joiner.add(window) for window in _windows_of(layout, waves))
        return resample_stream(joined, self.sample_rate, rate, layout.output_length(rate))

    def run_segments(self, segments: Sequence[Segment], progress: bool = False) -> List[torch.Tensor]:
        """Refine segments (any widths) and return their waveforms at the model's rate, in order.

        The segments of each width go through `refine_stream` together, so they are batched and
        recovered from running out of GPU memory as a folder's are; raises SegmentFailed (a
        SegmentTooLarge when a single segment does not fit).
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
                     ) -> Iterator[Tuple[int, Union[torch.Tensor, "SegmentFailed"]]]:
        """Refine segments of equal width, halving the batch on CUDA out-of-memory errors and
        retrying it one segment at a time after any other error of the device.

        Yields (index in `batch`, waveform) as parts finish, or (index, SegmentFailed) for a
        segment that cannot be refined: a SegmentTooLarge when it does not fit even alone, a
        SegmentFailed when the device failed on it in its batch and again alone. A smaller size
        that fits is remembered for the width (`fitting_batch`), so later batches start there;
        each segment keeps its own generator, so the results equal those of a run that never
        ran out of memory or retried.
        """
        width = batch[0].width
        parts = [list(range(len(batch)))]
        retried = set()  # segments already retried alone after an error of the device
        while parts:
            part = parts.pop(0)
            fits = self.fitting_batch.get(width, len(part))
            if len(part) > fits:
                parts[:0] = [part[lo:lo + fits] for lo in range(0, len(part), fits)]
                continue
            try:
                waves = self.run_batch([batch[k] for k in part], progress)
            except Exception as exc:  # torch raises its out-of-memory errors as several types
                out_of_memory = is_out_of_memory(exc)
                if not (out_of_memory or is_device_error(exc)):
                    raise  # a programming error: every batch would meet it
                failure = first_line(exc)
            else:
                yield from zip(part, waves)
                continue
            # Outside the except clause: the error's traceback, and with it the failed attempt's
            # tensors, is gone before the cached memory is released and the retry allocates.
            release_cached_memory(self.device)
            seconds = batch[part[0]].samples / self.sample_rate
            if not out_of_memory:
                if len(part) == 1 and part[0] in retried:
                    yield part[0], SegmentFailed(
                        f"the {self.device.type} device failed on a segment of {seconds:.1f} s ({width} frames) "
                        f"in its batch and again alone: {failure}")
                    continue
                # Once per segment: an error of one bad launch, or of one batch's shape, does not
                # come back alone; one that does fails only that segment's recording.
                logger.warning("%s error refining %d segment(s) of %d frames (%s): retrying them one at a time",
                               self.device.type, len(part), width, failure)
                retried.update(part)
                parts[:0] = [[k] for k in part]
                continue
            if len(part) == 1:
                yield part[0], SegmentTooLarge(
                    f"a segment of {seconds:.1f} s ({width} frames) does not "
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
        """Refine segments of equal width in one batch; returns waveforms at the model's rate on the CPU.

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
        return [spec_to_wave(spec[k], seg.samples, self.front_end) for k, seg in enumerate(batch)]

    def refine_stream(self, recordings: Iterable[Tuple[Any, Iterable[Segment]]], progress: bool = False
                      ) -> Iterator["Refined"]:
        """Refine recordings as they arrive, each given as (item, its segments, all of one width);
        yield a `Refined` for each one as soon as all its segments are done (or as soon as it has
        failed). `refine_segments`, with each recording's waves gathered.
        """
        items: Dict[int, Any] = {}
        waves: Dict[int, List[torch.Tensor]] = {}

        def numbered() -> Iterator[Tuple[int, Iterable[Segment]]]:
            for number, (item, segments) in enumerate(recordings):
                items[number] = item
                yield number, segments

        for event in self.refine_segments(numbered(), progress=progress):
            if isinstance(event, SegmentDone):
                waves.setdefault(event.item, []).append(event.wave)
                continue
            done = waves.pop(event.item, [])
            yield Refined(items.pop(event.item), None if event.error else done, event.error)

    def refine_segments(self, recordings: Iterable[Tuple[Any, Iterable[Segment]]], progress: bool = False
                        ) -> Iterator[Union["SegmentDone", "RecordingDone"]]:
        """Refine recordings as they arrive, each given as (item, its segments, all of one width,
        taken one by one as batches need them): the one batch runner, under the folder command
        and the Python API alike.

        Yields a `SegmentDone` for each segment, in each recording's order, then a
        `RecordingDone` once the recording's segments have run out and are all done; or, as soon
        as it fails, a `RecordingDone` with the error, and nothing more of it. A recording fails
        when a segment does not fit in GPU memory even alone (a SegmentTooLarge), when the device
        fails on a segment in its batch and again alone (a SegmentFailed), or when taking its
        next segment raises (reading it failed midway); the others go on.

        Segments of consecutive recordings of equal width share batches (of `batch_size_for` that
        width), so recordings sorted by width fill the batches; a batch runs as soon as it
        is full, so only a batch's worth of segments waits in memory, whatever a recording's
        length. `progress` shows each batch's reverse steps.
        """
        pending: List[Tuple[_InProgress, int, Segment]] = []  # (recording, index, segment), all of one width
        for item, segments in recordings:
            entry = _InProgress(item)
            taken = iter(segments)
            while not entry.failed:
                try:
                    segment = next(taken)
                except StopIteration:
                    break
                except Exception as exc:  # the boundary: reading one recording failed, the others go on
                    entry.failed = True
                    yield RecordingDone(item, exc)
                    break
                if pending and pending[0][2].width != segment.width:
                    yield from self._run_pending(pending, flush=True, progress=progress)
                pending.append((entry, entry.taken, segment))
                entry.taken += 1
                yield from self._run_pending(pending, flush=False, progress=progress)
            entry.exhausted = True
            if entry.finished:
                yield RecordingDone(item)
        yield from self._run_pending(pending, flush=True, progress=progress)

    def _run_pending(self, pending: List[Tuple["_InProgress", int, Segment]], flush: bool, progress: bool = False
                     ) -> Iterator[Union["SegmentDone", "RecordingDone"]]:
        """Run the full batches of `pending` (every batch with `flush`) and drop them from it."""
        while True:
            pending[:] = [waiting for waiting in pending if not waiting[0].failed]
            if not pending:
                return
            size = self.batch_size_for(pending[0][2].width)  # one width (refine_segments)
            if not flush and len(pending) < size:
                return  # wait for more segments of this width
            batch = pending[:size]
            for k, wave in self._run_fitting([segment for _, _, segment in batch], progress):
                entry, index, _ = batch[k]
                if entry.failed:
                    continue
                if isinstance(wave, SegmentFailed):
                    entry.failed = True
                    yield RecordingDone(entry.item, wave)
                    continue
                entry.done += 1
                yield SegmentDone(entry.item, index, wave)
                if entry.finished:
                    yield RecordingDone(entry.item)
            del pending[:len(batch)]

    def assemble(self, prepared: Prepared, waves: Sequence[torch.Tensor],
                 output_sample_rate: Optional[int] = None) -> np.ndarray:
        """Join refined windows into (channels, samples) at `output_sample_rate` (the model's if None).

        At the caller's own sample rate the output has exactly the input's sample count. Above
        the model's rate, with high_band "processed", the band above the model's comes from the
        processed input (`audio.crossover`).
        """
        per_channel = len(prepared.bounds)
        joiner = CrossfadeJoiner(prepared.bounds, self.overlap_samples)
        joined = np.concatenate([
            joiner.add(np.stack([waves[c * per_channel + k].numpy() for c in range(prepared.channels)]))
            for k in range(per_channel)], axis=1)
        rate = output_sample_rate or self.sample_rate
        length = prepared.output_length(rate)
        # Resampled before trimming: the padding of a short recording gives the resampler its
        # context, and the trim then gives exactly the input's duration.
        out = resample(joined, self.sample_rate, rate, length=length)
        if self.high_band_applies(rate, prepared.sample_rate):
            high = resample(prepared.processed, prepared.sample_rate, rate, length=length)
            out = crossover.join(out, np.broadcast_to(high, out.shape), rate, self.sample_rate)
        return out

    def high_band_applies(self, output_rate: int, input_rate: int) -> bool:
        """Whether an output at `output_rate` of a recording at `input_rate` takes the processed
        input's band above the model's (`--high-band processed` and a band there to take)."""
        return self.settings.output.high_band == "processed" and \
            crossover.applies(output_rate, input_rate, self.sample_rate)

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
        same duration (and at least one sample). Above the model's rate, the band above the
        model's is the processed input's (high_band "processed", the default) or empty ("none").
        `key` names the recording in the seed (the CLI uses its relative path).
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


class SegmentFailed(RuntimeError):
    """A segment that cannot be refined: the device failed on it in its batch and again alone.
    Its recording fails; the others go on."""


class SegmentTooLarge(SegmentFailed):
    """A single segment does not fit in GPU memory: its recording cannot be refined as set up."""


@dataclass
class Refined:
    """One recording out of `Refiner.refine_stream`: its waves (at the model's rate, one per segment), or the
    error that stopped it (then `waves` is None)."""

    item: Any
    waves: Optional[List[torch.Tensor]]
    error: Optional[Exception] = None


@dataclass
class SegmentDone:
    """One refined segment out of `Refiner.refine_segments`: its wave (16 kHz, on the CPU)."""

    item: Any
    index: int  # in its recording's order
    wave: torch.Tensor


@dataclass
class RecordingDone:
    """The end of a recording in `Refiner.refine_segments`: every segment done, or `error`."""

    item: Any
    error: Optional[Exception] = None


@dataclass
class _InProgress:
    """A recording whose segments are being refined."""

    item: Any
    taken: int = 0  # segments taken from it so far
    done: int = 0  # segments refined
    exhausted: bool = False  # no segment left to take
    failed: bool = False

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.failed and self.done == self.taken


def _windows_of(layout: Layout, waves: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
    """The refined windows (channels, n) in time order, from segment waves in `stream_segments`'
    order."""
    windows, channels = len(layout.bounds), layout.channels
    if layout.channel_major and channels > 1:
        waves = list(waves)
        for k in range(windows):
            yield np.stack([waves[c * windows + k].numpy() for c in range(channels)])
        return
    waves = iter(waves)
    for _ in range(windows):
        yield np.stack([next(waves).numpy() for _ in range(channels)])


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
