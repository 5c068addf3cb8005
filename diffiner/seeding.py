"""Every random number the package draws comes from a generator made here.

Results must not depend on batch composition, worker count, process count or the order of work,
so nothing draws from global random state: each unit of work (a segment of a recording, a training
example, a demo file) gets its own generator, derived from the run's seed and the unit's identity.

Two derivations exist, and each is part of what a seed means, so neither may change:

- `derive_seed(seed, *parts)` hashes the seed with any parts, strings included (relative paths,
  channel and window numbers). It seeds the refiner's segments and the demo's noise.
- `stream_rng` / `stream_generator(seed, stream, index)` use numpy's SeedSequence over integers. It defines the
  training example stream (and unconditional samples); changing it would break the exact resume of
  runs started with earlier versions.
"""

import hashlib
import random
from typing import Sequence, Union

import numpy as np
import torch

# Independent integer streams of `stream_generator`: keep the numbers, they define the data a
# seed produces.
STREAM_FILE_ORDER = 0
STREAM_EXCERPT = 1
STREAM_DIFFUSION = 2
STREAM_SAMPLING = 3

# One generator for a whole batch, or one per batch item (then each item's draws depend only on
# its own generator, not on what else shares the batch).
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]

_SEED_BITS = 63  # torch's manual_seed takes a signed 64-bit value


def seed_globals(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators: only what cannot take a generator
    of its own (weight initialisation, dropout) draws from them."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def derive_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed that depends only on `seed` and `parts` (hashed: stable across processes,
    unlike Python's salted hash())."""
    text = "\x00".join(str(p) for p in (seed, *parts))
    # surrogateescape: a file name that is not UTF-8 (its bytes held as surrogate escapes) hashes
    # as those bytes; every other text encodes as plain UTF-8, so no seed changes.
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8], "little")


def torch_generator(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded with the low 63 bits of `seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & ((1 << _SEED_BITS) - 1))
    return generator


def numpy_rng(seed: int, *parts: object) -> np.random.Generator:
    """A numpy generator that depends only on `seed` and `parts`."""
    return np.random.default_rng(derive_seed(seed, *parts))


def stream_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """A numpy generator that depends only on (seed, stream, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def stream_generator(seed: int, stream: int, index: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A torch generator on `device` that depends only on (seed, stream, index).

    Training draws example `index`'s timestep and noise from STREAM_DIFFUSION (on the CPU: the
    example stream of a seed is the same on every machine); sampling draws sample `index`'s noise
    from STREAM_SAMPLING on the device that runs the network, so a sample does not depend on its
    batch.
    """
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]
    return torch_generator(int(state) >> 1, device)


def randn(shape: Sequence[int], device: Union[str, torch.device], generator: Generators) -> torch.Tensor:
    """Gaussian noise of `shape` on `device`; with a list of generators, item k of the batch is
    drawn from generator k alone.

    Generators on `device` draw there. CPU generators for another device (training's per-example
    stream) fill one host buffer, pinned when the device is CUDA, which reaches the device in a
    single non-blocking copy rather than one blocking copy per item; the values are those of
    drawing each item on its own.
    """
    device = torch.device(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        if all(g.device.type == "cpu" for g in generator):
            host = torch.empty(tuple(shape), pin_memory=device.type == "cuda")
            for item, g in zip(host, generator):
                torch.randn(tuple(shape[1:]), generator=g, out=item)
            return host.to(device, non_blocking=True)
        return torch.stack([
            torch.randn(tuple(shape[1:]), generator=g, device=g.device).to(device) for g in generator
        ])
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
