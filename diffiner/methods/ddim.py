"""Plain DDIM sampling (Song et al. 2021), with no observation: what the prior alone makes.

eta 0 is deterministic DDIM; eta 1 draws the fresh noise of DDPM's posterior. As a refinement
method it ignores the noisy and processed recordings apart from their shape: it shows what the
prior generates, a reference for what Diffiner and Diffiner+ take from the observation.
"""

import math
from dataclasses import dataclass

import torch

from .base import Etas, ReverseProcess, Step


@dataclass(frozen=True)
class DDIMEtas(Etas):
    """eta: the share of DDPM's posterior noise drawn at each step (0: deterministic DDIM)."""

    eta: float = 0.0


class DDIM(ReverseProcess):
    name = "ddim"
    etas_type = DDIMEtas
    description = "unconditional DDIM/DDPM sampling from the prior, ignoring the observation"

    def step(self, step: Step) -> torch.Tensor:
        alpha_bar_prev = step.a ** 2
        sigma = self.etas.eta * math.sqrt(max((1 - alpha_bar_prev) / (1 - step.alpha_bar), 0.0)
                                          * max(1 - step.alpha_bar / alpha_bar_prev, 0.0))
        direction = math.sqrt(max(1 - alpha_bar_prev - sigma ** 2, 0.0))
        return step.a * step.x0 + direction * step.eps + sigma * step.z
