"""Diffiner+ (Sawata et al. 2023, Algorithm 2): Diffiner whose observed bins also follow the
prior's own direction s * eps_hat.

In the bins where the observation noise dominates, x_{i-1} = a x0 + eta_a s eps + eta_c
(s / sigma_y)(y - x0) + s std z, with the leftover variance std^2 = 1 - eta_a^2 - eta_c^2 -
2 eta_a eta_c rho clamped at zero; rho is the cosine similarity of the two directions, measured
per batch item (one segment of one channel) over the bins that use this update. Bins in an
inpainting mask ignore the observation and follow DDIM with eta_d.
"""

import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .base import Etas, ReverseProcess, Step
from .diffiner import SIGMA_EPS, noise_dominated, noise_dominated_update

logger = logging.getLogger(__name__)


def diffiner_plus_update(x0: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, sigma_y: torch.Tensor,
                         a: float, s: float, z: torch.Tensor, eta_a: float, eta_b: float, eta_c: float,
                         eta_d: float, inpaint_mask: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Diffiner+ step; returns (x_{i-1}, per-item fresh-noise variance before clamping)."""
    dominated = noise_dominated(sigma_y, a, s).expand_as(x0)
    observation_dir = (s / (sigma_y + SIGMA_EPS)) * (y - x0)
    prior_dir = s * eps
    own = ~dominated
    if inpaint_mask is not None:
        inpaint = inpaint_mask.bool().expand_as(x0) & own
        own = own & ~inpaint
    batch = x0.shape[0]
    if eta_c > 0:
        rho = masked_cosine(prior_dir, observation_dir, own)
    else:
        rho = torch.zeros(batch, device=x0.device)
    variance = 1 - eta_a ** 2 - eta_c ** 2 - 2 * eta_a * eta_c * rho
    std = torch.sqrt(torch.clamp(variance, min=0.0)).reshape(batch, *([1] * (x0.ndim - 1)))
    out = a * x0 + eta_a * prior_dir + eta_c * observation_dir + s * std * z
    if inpaint_mask is not None:
        generated = a * x0 + eta_d * prior_dir + s * math.sqrt(1 - eta_d ** 2) * z
        out = torch.where(inpaint, generated, out)
    out = torch.where(dominated, noise_dominated_update(x0, y, sigma_y, a, s, z, eta_b), out)
    return out, variance


def masked_cosine(u: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of u and v over the masked entries of each batch item (0 where empty)."""
    m = mask.float()
    dims = list(range(1, u.ndim))
    dot = (m * u * v).sum(dims)
    norm = torch.sqrt((m * u * u).sum(dims) * (m * v * v).sum(dims))
    return torch.where(norm > 0, dot / norm.clamp_min(1e-30), torch.zeros_like(dot))


@dataclass(frozen=True)
class DiffinerPlusEtas(Etas):
    """eta_a: weight of the prior's direction; eta_b: as Diffiner's; eta_c: weight of the
    observation's direction; eta_d: DDIM eta of inpainted bins. eta_a^2 + eta_c^2 <= 1."""

    eta_a: float = 0.4
    eta_b: float = 0.6
    eta_c: float = 0.0
    eta_d: float = 0.6

    def __post_init__(self):
        super().__post_init__()
        if self.eta_a ** 2 + self.eta_c ** 2 > 1.0 + 1e-12:
            raise ValueError(f"Diffiner+ needs eta_a^2 + eta_c^2 <= 1, got eta_a={self.eta_a}, eta_c={self.eta_c}")


class DiffinerPlus(ReverseProcess):
    name = "diffiner+"
    etas_type = DiffinerPlusEtas
    description = "Diffiner+: the observed bins also follow the prior's direction (the default)"
    supports_inpainting = True

    def __init__(self, etas: DiffinerPlusEtas):
        super().__init__(etas)
        # Counted on the device and read once in `finish`: reading a GPU tensor from Python at
        # every step would make the host wait for the GPU, leaving it idle while Python queues
        # the next step.
        self.clamped_steps: Optional[torch.Tensor] = None

    def step(self, step: Step) -> torch.Tensor:
        e = self.etas
        x, variance = diffiner_plus_update(step.x0, step.eps, step.y, step.sigma_y, step.a, step.s, step.z,
                                           e.eta_a, e.eta_b, e.eta_c, e.eta_d, step.inpaint_mask)
        clamped = (variance < 0).any()
        self.clamped_steps = clamped.long() if self.clamped_steps is None else self.clamped_steps + clamped
        return x

    def finish(self, steps: int) -> None:
        clamped = int(self.clamped_steps) if self.clamped_steps is not None else 0
        if clamped:
            logger.warning(
                "Diffiner+: eta_a^2 + eta_c^2 + 2 eta_a eta_c rho exceeded 1 at %d of %d steps; "
                "the fresh-noise variance was clamped to 0 there", clamped, steps,
            )
