"""Timestep samplers for training (guided-diffusion's `resample.py`, renamed: in an audio toolkit
"resample" means sample-rate conversion).

A sampler draws the diffusion timestep of each training example together with an importance
weight that keeps the loss an unbiased estimate of the uniform-timestep objective. The
loss-aware sampler draws more often the timesteps whose loss varies most (Nichol & Dhariwal
2021, "Improved DDPM", section 3.3); its loss history is part of the training state, so it
is checkpointed and restored for an exact resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Tuple

import numpy as np
import torch

from . import dist_util
from .seeding import Generators

SAMPLER_NAMES = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion) -> "ScheduleSampler":
    """The sampler called `name` ("uniform" or "loss-second-moment") for `diffusion`."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")


class ScheduleSampler(ABC):
    """A distribution over timesteps; subclasses give its (unnormalised) weights."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Positive weight of each timestep, shape (num_timesteps,)."""

    def sample(self, batch_size: int, device, generator: Generators = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw `batch_size` timesteps and their importance weights 1 / (T p(t)).

        `generator` is None (torch's global generator), one CPU torch.Generator, or a list of
        `batch_size` of them, one per example: then each example's timestep depends only on
        its own generator, not on which examples share its batch.
        """
        probs = self.weights()
        probs = torch.from_numpy(probs / probs.sum())
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
            indices = torch.cat([torch.multinomial(probs, 1, replacement=True, generator=g) for g in generator])
        else:
            indices = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(probs) * probs[indices])
        # Drawn on the host: copies that do not wait for the device (the source is staged at once).
        return indices.long().to(device, non_blocking=True), weights.float().to(device, non_blocking=True)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """What must be saved to continue sampling exactly after a restart."""
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore the state returned by `state_dict`."""


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (the Diffiner default); all importance weights are 1."""

    def __init__(self, diffusion):
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses it is told about."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's (timestep, loss) pairs after gathering every rank's.

        Must be called on every rank at the same point: all ranks then hold the same history
        (ordered by rank), hence the same weights, as a single process with the global batch.
        """
        timesteps = dist_util.all_gather_cat(local_ts.detach())
        losses = dist_util.all_gather_cat(local_losses.detach().float())
        self.update_with_all_losses(timesteps.cpu().tolist(), losses.cpu().tolist())

    @abstractmethod
    def update_with_all_losses(self, ts: List[int], losses: List[float]) -> None:
        """Record the losses of the whole (global) batch, in a rank-independent order."""


class LossSecondMomentResampler(LossAwareSampler):
    """Sample t with probability proportional to sqrt(E[loss_t^2]) over recent history.

    Uniform until every timestep has `history_per_term` recorded losses; a `uniform_prob`
    share of the mass always stays uniform so that no timestep is starved.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: List[int], losses: List[float]) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"loss_history": torch.from_numpy(self._loss_history.copy()),
                "loss_counts": torch.from_numpy(self._loss_counts.copy())}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        history = state["loss_history"].numpy()
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"saved loss history has shape {tuple(history.shape)}, expected {self._loss_history.shape} "
                "(was the checkpoint trained with another diffusion_steps?)"
            )
        self._loss_history = history.astype(np.float64)
        self._loss_counts = state["loss_counts"].numpy().astype(np.int64)
