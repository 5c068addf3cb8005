"""Timestep respacing: sampling with a subset of the training timesteps.

A respaced process keeps the original cumulative alphas at the kept steps and recomputes
betas between them, so it is a proper diffusion process of its own with fewer steps. The
network was trained on the original indices, so `SpacedDiffusion` always calls it with those
(`timestep_map`), never with the respaced index.
"""

from typing import Iterable, List, Sequence, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> Set[int]:
    """The original timesteps to keep.

    `section_counts` is either "ddimN" — every k-th step for the smallest stride k that
    gives exactly N steps, as DDIM does — or a comma list / sequence of counts: the T steps are
    cut into that many equal sections and each section keeps that many evenly spaced steps.
    Raises ValueError, naming the value, for anything else, counts below 1 included, and for a
    respacing of T > 1 steps that keeps step 0 alone (`ddim1`, `1`): see `_check_not_only_step_0`.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = _count(section_counts[len("ddim"):], section_counts)
        # Stride T included: it gives the one step of ddim1, which the check below judges.
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == desired:
                kept = set(range(0, num_timesteps, stride))
                _check_not_only_step_0(kept, num_timesteps, section_counts)
                return kept
        raise ValueError(f"{section_counts!r}: cannot take exactly {desired} steps from {num_timesteps} "
                         "with an integer stride")
    spec = section_counts
    if isinstance(section_counts, str):
        section_counts = [_count(x, section_counts) for x in section_counts.split(",")]
    if not section_counts or any(count < 1 for count in section_counts):
        raise ValueError(f"every section must keep at least one step, got {list(section_counts)}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept: List[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += frac_stride
        start += size
    _check_not_only_step_0(set(kept), num_timesteps, spec)
    return set(kept)


def _check_not_only_step_0(kept: Set[int], num_timesteps: int, spec) -> None:
    """ValueError for a respacing of more than one step that keeps step 0 alone.

    Sampling starts from N(0, I) at the highest kept step, which stands for the forward process
    there: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise. That is sound only where
    alpha_bar_t is near 0. At step 0 alpha_bar_0 = 1 - beta_0 is near 1 for every schedule
    (0.99998 for the published linear one), so a chain of step 0 alone reads its start noise as
    an almost clean spectrogram and returns it unchanged: no sample, no refinement. The DDIM
    stride rule gives this for one step (ddim1), so one step cannot work. All of a process of one
    step (--diffusion_steps 1) is not a respacing and is not judged here.
    """
    if kept == {0} and num_timesteps > 1:
        raise ValueError(f"{spec!r} keeps only step 0 of {num_timesteps}, the least noisy one, where sampling "
                         "would return its start noise unchanged; keep at least 2 steps (e.g. ddim2)")


def _count(text: str, spec: str) -> int:
    """A positive step count from `text`, part of the respacing `spec`; ValueError naming both."""
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{spec!r} is not 'ddimN' or a comma list of step counts") from None
    if count < 1:
        raise ValueError(f"{spec!r}: a step count must be at least 1, got {count}")
    return count


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only `use_timesteps` of the base process."""

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = len(kwargs["betas"])
        kept_alphas = base.alphas_cumprod[sorted(self.use_timesteps)]
        prev = np.append(1.0, kept_alphas[:-1])
        kwargs["betas"] = 1 - kept_alphas / prev
        self.timestep_map = np.array(sorted(self.use_timesteps), dtype=np.int64)
        super().__init__(**kwargs)

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The base-process index of respaced index `t`."""
        return self.schedule_tensor("timestep_map", t.device)[t]

    def predict_start(self, model, *args, **kwargs):
        return super().predict_start(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _OriginalTimestepModel):
            return model
        return _OriginalTimestepModel(model, self)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapper maps and rescales; here the respaced index passes through untouched.
        return t


class _OriginalTimestepModel:
    """Calls the network with original (optionally rescaled) timesteps instead of respaced ones."""

    def __init__(self, model, diffusion: SpacedDiffusion):
        self.model = model
        self.diffusion = diffusion

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        original = self.diffusion.original_timesteps(t)
        if self.diffusion.rescale_timesteps:
            original = original.float() * (1000.0 / self.diffusion.original_num_steps)
        return self.model(x, original, **kwargs)
