"""Unconditional sampling from a trained prior: the application layer of `diffiner-sample`.

Sample i starts from noise drawn with a generator seeded by (seed, i) alone, so it does not
depend on the batch size or on how samples are shared among processes. The spectrogram holds
one frame past the signal and is inverted whole before trimming, as in the refiner, so a sample
does not click at its end.
"""

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .acceleration import AUTO, ExecutionSettings, NetworkRunner
from .audio.io import save_audio
from .audio.records import OutputRecord
from .flags import setting
from .pipeline import padded_width
from .seeding import STREAM_SAMPLING, stream_generator
from .spectrogram import front_end_of, spec_to_wave


@dataclass(frozen=True)
class SamplingSettings:
    """What is sampled: the one declaration of diffiner-sample's sampling flags."""

    num_samples: int = setting(8, "how many samples to write")
    seconds: float = setting(4.0, "length of each sample in seconds")
    batch_size: int = setting(4, "samples generated together")
    seed: int = setting(0, "seed; sample i depends only on it and i")
    use_ddim: bool = setting(False, "DDIM sampling (deterministic given the start noise) instead of DDPM "
                                    "ancestral sampling")


def sample_name(index: int) -> str:
    """The file name of sample `index`."""
    return f"sample_{index:03d}.wav"


def sample_spectrograms(network, diffusion, indices: Sequence[int], shape: Sequence[int], *, seed: int,
                        use_ddim: bool, device: torch.device) -> torch.Tensor:
    """Spectrograms (len(indices), *shape) of the samples numbered `indices`, drawn by `network`.

    Each sample's generator lives on `device`, as the refiner's segment generators do: its noise,
    drawn at every step, is made there instead of on the CPU and copied.
    """
    generators = [stream_generator(seed, STREAM_SAMPLING, i, device) for i in indices]
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    return loop(network, (len(indices), *shape), device=device, generator=generators)


def sample_waves(model: torch.nn.Module, diffusion, indices: Sequence[int], settings: SamplingSettings, *,
                 device: torch.device, precision: str = AUTO, channels_last: Optional[bool] = None,
                 progress: bool = False) -> Iterator[tuple]:
    """(index, waveform at the model's rate) of each sample numbered in `indices`,
    `settings.batch_size` at a time. Precision "auto" and channels_last None take the device's
    defaults, as refining does (`acceleration.default_execution`); autocast is entered once per
    batch's reverse process."""
    execution = ExecutionSettings(precision, channels_last).resolved(device)
    network = NetworkRunner(model.to(device).eval(), execution.precision, execution.channels_last)
    front_end = front_end_of(model)
    samples = int(round(settings.seconds * front_end.sample_rate))
    shape = (model.in_channels, front_end.num_bins,
             padded_width(samples, model.downsample_factor, samples, front_end))
    size = settings.batch_size
    batches = [list(indices[lo:lo + size]) for lo in range(0, len(indices), size)]
    for batch in tqdm(batches, desc="sampling", unit="batch", disable=not progress):
        with network.session():
            spec = sample_spectrograms(network, diffusion, batch, shape, seed=settings.seed,
                                       use_ddim=settings.use_ddim, device=device)
        waves = spec_to_wave(spec.float().cpu(), samples, front_end)  # every frame, then trim: no end click
        yield from zip(batch, (wave.numpy() for wave in waves))


def write_samples(output_dir: str, samples: Iterator[tuple], sample_rate: int,
                  record: Optional[OutputRecord] = None) -> int:
    """Write each (index, waveform at `sample_rate`) as `output_dir`/sample_NNN.wav, atomically,
    adding it to `record`; returns the count."""
    count = 0
    for index, wave in samples:
        save_audio(os.path.join(output_dir, sample_name(index)), np.asarray(wave), sample_rate)
        if record is not None:
            record.add(sample_name(index), {})  # made from the checkpoint alone: in the record's settings
        count += 1
    return count
