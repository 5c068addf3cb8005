"""Gaussian diffusion (Ho et al. 2020) with the improvements of Nichol & Dhariwal (2021).

The schedule arithmetic runs in float64 numpy; each schedule array becomes a float32 tensor on a
device once per process (`GaussianDiffusion.schedule_tensor`), so fp16/bf16 networks never degrade
the diffusion arithmetic and looking a coefficient up at a sampling step copies nothing from the
host (a blocking copy would synchronise the GPU at every step).
Timestep indices `t` are indices into this process's own schedule; `SpacedDiffusion`
(respace.py) maps them back to the original indices before calling the network.
"""

import enum
import math
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .seeding import Generators, randn


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = enum.auto()  # the network outputs log-variance
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t=0)
    LEARNED_RANGE = enum.auto()  # interpolation between the two, in log space


class LossType(enum.Enum):
    MSE = enum.auto()
    RESCALED_MSE = enum.auto()  # MSE, with the variational term scaled as with RESCALED_KL
    KL = enum.auto()
    RESCALED_KL = enum.auto()

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas of a named schedule, float64.

    "linear" is Ho et al.'s 1e-4 .. 0.02 over 1000 steps, scaled by 1000/T so that any step
    count covers the same noise range; "cosine" is Nichol & Dhariwal's.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        if 0.02 * scale >= 1:
            raise ValueError(f"the linear schedule needs more than 20 steps (its last beta would be {0.02 * scale:g})")
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown noise schedule {schedule_name!r} (expected 'linear' or 'cosine')")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous cumulative-alpha function on [0, 1]."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class GaussianDiffusion:
    """Training and sampling utilities for a fixed beta schedule.

    :param betas: float64 array of betas, one per timestep, starting at t=0.
    :param model_mean_type: what the network outputs.
    :param model_var_type: how the variance is obtained.
    :param loss_type: training objective.
    :param rescale_timesteps: pass timesteps scaled to [0, 1000) to the network, as the
        original DDPM code did; Diffiner's published model uses the plain indices.
    """

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType, rescale_timesteps: bool = False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0: clip the log so it stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # Derived arrays the methods below look up, named so that each has a device copy.
        self.log_betas = np.log(betas)
        self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self._device_tables: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    def schedule_tensor(self, name: str, device) -> torch.Tensor:
        """The schedule array attribute `name` as a tensor on `device`, made once and then reused.

        Floating arrays become float32; integer arrays (a respaced process's timestep map) keep
        their type. Subclasses may look up their own arrays here.
        """
        device = torch.device(device)
        table = self._device_tables.get((name, device))
        if table is None:
            array = torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
            if array.is_floating_point():
                array = array.float()
            table = self._device_tables[(name, device)] = array.to(device)
        return table

    def _extract(self, name: str, t: torch.Tensor, broadcast_shape) -> torch.Tensor:
        """The schedule array `name` at timesteps `t`, float32 on t's device, shaped to broadcast
        over a batch of `broadcast_shape`."""
        res = self.schedule_tensor(name, t.device)[t]
        return res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim))

    # ----- forward process -----
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # ----- reverse process -----
    def predict_start(self, model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                      denoised_fn: Optional[Callable] = None, model_kwargs: Optional[Dict[str, Any]] = None
                      ) -> Dict[str, torch.Tensor]:
        """One network call: the prediction of x_0 and the noise it implies, in float32.

        Returns pred_xstart, eps, model_output (the mean part of the output) and var_values
        (the variance part, None unless the variance is learned). Samplers that need no
        reverse-process variance (DDIM, the refiner) use this directly.
        """
        model_output = model(x, self._scale_timesteps(t), **(model_kwargs or {})).float()
        var_values = None
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = torch.split(model_output, x.shape[1], dim=1)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
        elif self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        if self.model_mean_type == ModelMeanType.EPSILON and not clip_denoised and denoised_fn is None:
            eps = model_output
        else:
            eps = self._predict_eps_from_xstart(x, t, pred_xstart)
        return {"pred_xstart": pred_xstart, "eps": eps, "model_output": model_output, "var_values": var_values}

    def p_mean_variance(self, model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False,
                        denoised_fn: Optional[Callable] = None, model_kwargs: Optional[Dict[str, Any]] = None
                        ) -> Dict[str, torch.Tensor]:
        """Apply the network to get p(x_{t-1} | x_t) and the prediction of x_0.

        Returns a dict with mean, variance, log_variance, pred_xstart and eps (the noise the
        network's prediction implies), all in float32.
        """
        out = self.predict_start(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = out["var_values"]
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
            max_log = self._extract("log_betas", t, x.shape)
            frac = (out["var_values"] + 1) / 2  # the network outputs [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            # beta_t, except at t=0 where the posterior variance gives a better decoder.
            log_variance = self._extract("fixed_large_log_variance", t, x.shape)
        else:
            log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)
        log_variance = log_variance.expand(x.shape)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            mean = out["model_output"]
        else:
            mean, _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": out["pred_xstart"], "eps": out["eps"]}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return (self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
                - self._extract("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def p_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                 generator: Generators = None) -> Dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1}; no noise is added at t=0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = randn(x.shape, x.device, generator)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None,
                      model_kwargs=None, device=None, progress=False, generator=None) -> torch.Tensor:
        """Ancestral sampling (DDPM) from pure noise; returns x_0."""
        return self._loop(self.p_sample, model, shape, noise, device, progress, generator,
                          clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)

    def ddim_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                    eta: float = 0.0, generator: Generators = None) -> Dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021); eta=0 is deterministic, eta=1 matches DDPM's variance."""
        out = self.predict_start(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = out["eps"]
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                     + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero * sigma * randn(x.shape, x.device, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, generator=None) -> torch.Tensor:
        """DDIM sampling from pure noise; returns x_0."""
        return self._loop(self.ddim_sample, model, shape, noise, device, progress, generator,
                          clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta)

    def _loop(self, step_fn, model, shape, noise, device, progress, generator, **step_kwargs):
        if device is None:
            device = next(model.parameters()).device
        x = noise if noise is not None else randn(shape, device, generator)
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(steps, disable=not progress, desc="sampling"):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                x = step_fn(model, x, t, generator=generator, **step_kwargs)["sample"]
        return x

    # ----- training -----
    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs=None,
                        noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Per-example training losses at timesteps `t`: a dict with "loss" and its terms."""
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs).float()
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            channels = x_t.shape[1]
            model_output, var_values = torch.split(model_output, channels, dim=1)
            # The variance is trained by the VB term only; the mean gets no gradient from it.
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_: frozen, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Nichol & Dhariwal divide the VB term by 1000 when the MSE dominates.
                terms["vb"] = terms["vb"] * self.num_timesteps / 1000.0
        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=False, model_kwargs=None):
        """One term of the variational bound, in bits per dimension.

        At t=0 the decoder term is a continuous Gaussian negative log-likelihood: spectrogram
        values are real-valued, so the image-specific discretised likelihood does not apply.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -mean_flat(
            gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        ) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}
