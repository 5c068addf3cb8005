"""The reverse-process loop of refinement (docs/method.md, "The refiner").

`refine` owns what every method shares: the timesteps of the (respaced) diffusion, the network
call that predicts x0 and eps, and the fresh noise of every step, drawn from per-item
generators so that an item's result does not depend on its batch. What x_{i-1} is, given those,
is the method's (`diffiner.methods`: Diffiner, Diffiner+, plain DDIM, or a registered plug-in).
The arithmetic outside the network is float32.
"""

import logging
import math
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from .gaussian_diffusion import GaussianDiffusion
from .methods import DEFAULT_METHOD, ReverseProcess, Step, build_method
from .seeding import Generators, randn

logger = logging.getLogger(__name__)


def refine(model, diffusion: GaussianDiffusion, noisy: torch.Tensor, noise_map: torch.Tensor, *,
           method: Union[str, ReverseProcess] = DEFAULT_METHOD, inpaint_mask: Optional[torch.Tensor] = None,
           clip_denoised: bool = False, generator: Generators = None, progress: bool = False,
           **etas: Optional[float]) -> torch.Tensor:
    """Run a reverse process conditioned on the observation and return the refined spectrogram
    (B, 2, F, T).

    :param model: the epsilon network (called with original timestep indices by `diffusion`).
    :param diffusion: usually a respaced process (e.g. ddim200); its steps are the chain.
    :param noisy: the observation y, (B, 2, F, T).
    :param noise_map: sigma_y, (B, 1 or 2, F, T).
    :param method: a registered method's name (its etas from `etas`, defaults for the rest), or
        a ReverseProcess instance (then `etas` must be empty).
    :param generator: one torch.Generator, or one per batch item so that each item's result
        does not depend on what else is in the batch.
    """
    if isinstance(method, str):
        process = build_method(method, etas)
    elif etas:
        raise TypeError("give the etas to the ReverseProcess instance, not to refine")
    else:
        process = method
    if noisy.ndim != 4 or noisy.shape[1] != 2:
        raise ValueError(f"noisy must be (B, 2, F, T), got {tuple(noisy.shape)}")
    if noise_map.ndim != 4 or noise_map.shape[1] not in (1, 2) or noise_map.shape[0] != noisy.shape[0] \
            or noise_map.shape[2:] != noisy.shape[2:]:
        raise ValueError(f"noise_map must be (B, 1 or 2, F, T) matching noisy {tuple(noisy.shape)}, "
                         f"got {tuple(noise_map.shape)}")
    if inpaint_mask is not None and not process.supports_inpainting:
        raise ValueError(f"inpaint_mask is not supported by {process.name}")

    y = noisy.float()
    sigma_y = noise_map.float()
    x = randn(y.shape, y.device, generator)
    steps = list(range(diffusion.num_timesteps))[::-1]
    for i in tqdm(steps, disable=not progress, desc=process.name, leave=False):
        t = torch.full((y.shape[0],), i, device=y.device, dtype=torch.long)
        with torch.no_grad():
            out = diffusion.predict_start(model, x, t, clip_denoised=clip_denoised)
        alpha_bar_prev = float(diffusion.alphas_cumprod_prev[i])  # a numpy float64: no device access
        a, s = math.sqrt(alpha_bar_prev), math.sqrt(1.0 - alpha_bar_prev)
        # The last step adds no noise (s = 0): skip the draw, it would be multiplied by zero.
        z = randn(y.shape, y.device, generator) if s > 0 else torch.zeros_like(y)
        x = process.step(Step(x0=out["pred_xstart"], eps=out["eps"], y=y, sigma_y=sigma_y, a=a, s=s,
                              alpha_bar=float(diffusion.alphas_cumprod[i]), z=z, inpaint_mask=inpaint_mask))
    process.finish(len(steps))
    return x
