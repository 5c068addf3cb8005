"""Diffiner (Sawata et al. 2023, Algorithm 1): a DDRM-style restoration in the STFT domain.

Every bin takes one of two branches at each step. Where the diffusion noise dominates the
observation noise (s > a * sigma_y), x moves toward a blend of the prediction x0_hat and the
observation y, with the variance that keeps the marginal consistent. Elsewhere it stays near
x0_hat, pulled toward y by an amount scaled by s / sigma_y. The arithmetic is float32.
"""

import math
from dataclasses import dataclass

import torch

from .base import Etas, ReverseProcess, Step

SIGMA_EPS = 1e-5  # keeps s / sigma_y finite where the SE output equals the observation


def noise_dominated(sigma_y: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """Mask of the bins where the diffusion noise exceeds the observation noise."""
    return s > a * sigma_y


def noise_dominated_update(x0, y, sigma_y, a, s, z, eta_b):
    """Branch 1 (Diffiner and Diffiner+): blend of prediction and observation plus the remaining noise."""
    std = torch.sqrt(torch.clamp(s ** 2 - (eta_b * a * sigma_y) ** 2, min=0.0))
    return (1 - eta_b) * a * x0 + eta_b * a * y + std * z


def diffiner_update(x0: torch.Tensor, y: torch.Tensor, sigma_y: torch.Tensor, a: float, s: float,
                    z: torch.Tensor, eta_a: float, eta_b: float) -> torch.Tensor:
    """One Diffiner step x_i -> x_{i-1}, given x0_hat, the observation and fresh noise z."""
    observed = a * x0 + math.sqrt(1 - eta_a ** 2) * (s / (sigma_y + SIGMA_EPS)) * (y - x0) + eta_a * s * z
    return torch.where(noise_dominated(sigma_y, a, s), noise_dominated_update(x0, y, sigma_y, a, s, z, eta_b), observed)


@dataclass(frozen=True)
class DiffinerEtas(Etas):
    """eta_a: the fresh noise of the observed bins; eta_b: the pull toward y of the noise-dominated bins."""

    eta_a: float = 0.9
    eta_b: float = 0.9


class Diffiner(ReverseProcess):
    name = "diffiner"
    etas_type = DiffinerEtas
    description = "Diffiner: DDRM-style update toward the observation"

    def step(self, step: Step) -> torch.Tensor:
        return diffiner_update(step.x0, step.y, step.sigma_y, step.a, step.s, step.z, self.etas.eta_a,
                               self.etas.eta_b)
