"""The Diffiner and Diffiner+ reverse processes (docs/method.md, "The refiner").

Both are DDRM-style restorations in the complex STFT domain. The observation is the noisy
spectrogram y, and the per-bin noise level sigma_y = |y - s_hat| says how far the SE output
moved away from it. At each reverse step every bin takes one of two branches:

* diffusion noise dominates (s > a * sigma_y): move toward a blend of the prediction x0_hat
  and the observation y, with the variance that keeps the marginal consistent;
* otherwise: stay near x0_hat, pulled toward y by an amount scaled by s / sigma_y
  (Diffiner), or mixing the prior's own direction eps_hat in as well (Diffiner+).

The update functions below are pure tensor arithmetic, always in float32, so they can be
tested without a network; `refine` runs the whole chain.
"""

import logging
import math
from typing import Dict, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .gaussian_diffusion import GaussianDiffusion
from .seeding import Generators, randn

logger = logging.getLogger(__name__)

METHODS = ("diffiner", "diffiner+")
DEFAULT_ETAS: Dict[str, Dict[str, float]] = {
    "diffiner": {"eta_a": 0.9, "eta_b": 0.9},
    "diffiner+": {"eta_a": 0.4, "eta_b": 0.6, "eta_c": 0.0, "eta_d": 0.6},
}
SIGMA_EPS = 1e-5  # keeps s / sigma_y finite where the SE output equals the observation


def resolve_etas(method: str, eta_a: Optional[float] = None, eta_b: Optional[float] = None,
                 eta_c: Optional[float] = None, eta_d: Optional[float] = None) -> Dict[str, float]:
    """The etas used by `method`: the given ones, the paper's defaults for the rest.

    Raises ValueError for an unknown method, an eta outside [0, 1], eta_a^2 + eta_c^2 > 1, or
    eta_c / eta_d given to Diffiner, which has no use for them.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    given = {"eta_a": eta_a, "eta_b": eta_b, "eta_c": eta_c, "eta_d": eta_d}
    etas = dict(DEFAULT_ETAS[method])
    for name, value in given.items():
        if value is None:
            continue
        if name not in etas:
            raise ValueError(f"{name} is not used by {method}; only {sorted(etas)} are")
        etas[name] = float(value)
    for name, value in etas.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if method == "diffiner+" and etas["eta_a"] ** 2 + etas["eta_c"] ** 2 > 1.0 + 1e-12:
        raise ValueError(f"Diffiner+ needs eta_a^2 + eta_c^2 <= 1, got eta_a={etas['eta_a']}, eta_c={etas['eta_c']}")
    return etas


def noise_dominated(sigma_y: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """Mask of the bins where the diffusion noise exceeds the observation noise."""
    return s > a * sigma_y


def _noise_dominated_update(x0, y, sigma_y, a, s, z, eta_b):
    """Branch 1 (both methods): blend of prediction and observation plus the remaining noise."""
    std = torch.sqrt(torch.clamp(s ** 2 - (eta_b * a * sigma_y) ** 2, min=0.0))
    return (1 - eta_b) * a * x0 + eta_b * a * y + std * z


def diffiner_update(x0: torch.Tensor, y: torch.Tensor, sigma_y: torch.Tensor, a: float, s: float,
                    z: torch.Tensor, eta_a: float, eta_b: float) -> torch.Tensor:
    """One Diffiner step x_i -> x_{i-1}, given x0_hat, the observation and fresh noise z."""
    observed = a * x0 + math.sqrt(1 - eta_a ** 2) * (s / (sigma_y + SIGMA_EPS)) * (y - x0) + eta_a * s * z
    return torch.where(noise_dominated(sigma_y, a, s), _noise_dominated_update(x0, y, sigma_y, a, s, z, eta_b), observed)


def diffiner_plus_update(x0: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, sigma_y: torch.Tensor,
                         a: float, s: float, z: torch.Tensor, eta_a: float, eta_b: float, eta_c: float,
                         eta_d: float, inpaint_mask: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Diffiner+ step; returns (x_{i-1}, per-utterance fresh-noise variance before clamping).

    rho, the cosine similarity between the prior direction s*eps and the observation direction
    (s / sigma_y)(y - x0), is measured per utterance over the bins that use this update; the
    leftover variance 1 - eta_a^2 - eta_c^2 - 2 eta_a eta_c rho is clamped at zero when negative.
    Bins in `inpaint_mask` ignore the observation and follow DDIM with eta_d.
    """
    dominated = noise_dominated(sigma_y, a, s).expand_as(x0)
    observation_dir = (s / (sigma_y + SIGMA_EPS)) * (y - x0)
    prior_dir = s * eps
    own = ~dominated
    if inpaint_mask is not None:
        inpaint = inpaint_mask.bool().expand_as(x0) & own
        own = own & ~inpaint
    batch = x0.shape[0]
    if eta_c > 0:
        rho = _masked_cosine(prior_dir, observation_dir, own)
    else:
        rho = torch.zeros(batch, device=x0.device)
    variance = 1 - eta_a ** 2 - eta_c ** 2 - 2 * eta_a * eta_c * rho
    std = torch.sqrt(torch.clamp(variance, min=0.0)).reshape(batch, *([1] * (x0.ndim - 1)))
    out = a * x0 + eta_a * prior_dir + eta_c * observation_dir + s * std * z
    if inpaint_mask is not None:
        generated = a * x0 + eta_d * prior_dir + s * math.sqrt(1 - eta_d ** 2) * z
        out = torch.where(inpaint, generated, out)
    out = torch.where(dominated, _noise_dominated_update(x0, y, sigma_y, a, s, z, eta_b), out)
    return out, variance


def _masked_cosine(u: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of u and v over the masked entries of each batch item."""
    m = mask.float()
    dims = list(range(1, u.ndim))
    dot = (m * u * v).sum(dims)
    norm = torch.sqrt((m * u * u).sum(dims) * (m * v * v).sum(dims))
    return torch.where(norm > 0, dot / norm.clamp_min(1e-30), torch.zeros_like(dot))


def refine(model, diffusion: GaussianDiffusion, noisy: torch.Tensor, noise_map: torch.Tensor, *,
           method: str = "diffiner+", eta_a: Optional[float] = None, eta_b: Optional[float] = None,
           eta_c: Optional[float] = None, eta_d: Optional[float] = None,
           inpaint_mask: Optional[torch.Tensor] = None, clip_denoised: bool = False,
           generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """Run the Diffiner(+) reverse process and return the refined spectrogram (B, 2, F, T).

    :param model: the epsilon network (called with original timestep indices by `diffusion`).
    :param diffusion: usually a respaced process (e.g. ddim200); its steps are the chain.
    :param noisy: the observation y, (B, 2, F, T).
    :param noise_map: sigma_y, (B, 1 or 2, F, T).
    :param generator: one torch.Generator, or one per batch item so that each item's result
        does not depend on what else is in the batch.
    """
    etas = resolve_etas(method, eta_a, eta_b, eta_c, eta_d)
    if noisy.ndim != 4 or noisy.shape[1] != 2:
        raise ValueError(f"noisy must be (B, 2, F, T), got {tuple(noisy.shape)}")
    if noise_map.ndim != 4 or noise_map.shape[1] not in (1, 2) or noise_map.shape[0] != noisy.shape[0] \
            or noise_map.shape[2:] != noisy.shape[2:]:
        raise ValueError(f"noise_map must be (B, 1 or 2, F, T) matching noisy {tuple(noisy.shape)}, "
                         f"got {tuple(noise_map.shape)}")
    if inpaint_mask is not None and method != "diffiner+":
        raise ValueError("inpaint_mask is only supported by Diffiner+")

    y = noisy.float()
    sigma_y = noise_map.float()
    x = randn(y.shape, y.device, generator)
    # Counted on the device and read once after the loop (Diffiner+ only): reading a GPU tensor
    # from Python at every step would make the host wait for the GPU to finish the step, leaving
    # the GPU idle while Python queues the next one. Nothing in the loop reads a tensor's value.
    clamped_steps = torch.zeros((), dtype=torch.long, device=y.device)
    steps = list(range(diffusion.num_timesteps))[::-1]
    for i in tqdm(steps, disable=not progress, desc=method, leave=False):
        t = torch.full((y.shape[0],), i, device=y.device, dtype=torch.long)
        with torch.no_grad():
            out = diffusion.predict_start(model, x, t, clip_denoised=clip_denoised)
        alpha_bar_prev = float(diffusion.alphas_cumprod_prev[i])  # a numpy float64: no device access
        a, s = math.sqrt(alpha_bar_prev), math.sqrt(1.0 - alpha_bar_prev)
        # The last step adds no noise (s = 0): skip the draw, it would be multiplied by zero.
        z = randn(y.shape, y.device, generator) if s > 0 else torch.zeros_like(y)
        if method == "diffiner":
            x = diffiner_update(out["pred_xstart"], y, sigma_y, a, s, z, etas["eta_a"], etas["eta_b"])
        else:
            x, variance = diffiner_plus_update(
                out["pred_xstart"], out["eps"], y, sigma_y, a, s, z, etas["eta_a"], etas["eta_b"],
                etas["eta_c"], etas["eta_d"], inpaint_mask,
            )
            clamped_steps += (variance < 0).any()
    if method == "diffiner+":
        clamped = int(clamped_steps)
        if clamped:
            logger.warning(
                "Diffiner+: eta_a^2 + eta_c^2 + 2 eta_a eta_c rho exceeded 1 at %d of %d steps; "
                "the fresh-noise variance was clamped to 0 there", clamped, len(steps),
            )
    return x
