"""Small building blocks shared by the network and the diffusion code."""

import contextlib
import inspect
import math
import warnings
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The network's normalisation layer: 32 groups, as in guided-diffusion."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling."""
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so that a residual branch starts as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs: tuple, params: Iterable[torch.Tensor], flag: bool):
    """Run `func(*inputs)`, recomputing activations in the backward pass when `flag` is set.

    Trades compute for memory during training; `params` is kept for call compatibility with
    guided-diffusion (torch's checkpoint finds the parameters itself).
    """
    if flag and torch.is_grad_enabled():
        return torch_checkpoint(func, *inputs, **_CHECKPOINT_KWARGS)
    return func(*inputs)


# The non-reentrant implementation handles parameters without requires_grad inputs; torch
# versions that have the switch warn unless it is given explicitly.
_CHECKPOINT_KWARGS = (
    {"use_reentrant": False} if "use_reentrant" in inspect.signature(torch_checkpoint).parameters else {}
)


@contextlib.contextmanager
def autocast(device_type: str, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """torch.autocast to `dtype`, or nothing for None/float32.

    Raises ValueError when this torch cannot autocast to `dtype` on `device_type` (torch itself
    only warns and silently runs in float32), so a user asking for bf16/fp16 never gets float32
    without knowing.
    """
    if dtype is None or dtype == torch.float32:
        yield
        return
    if not hasattr(torch, "autocast"):
        raise ValueError(f"this torch ({torch.__version__}) has no torch.autocast")
    with warnings.catch_warnings():
        # torch says it is "disabling" autocast (the wording varies by version) and runs float32.
        warnings.filterwarnings("error", message="(?s).*([Aa]utocast|[Dd]isabling).*", category=UserWarning)
        try:
            context = torch.autocast(device_type=device_type, dtype=dtype)
            context.__enter__()
        except (RuntimeError, UserWarning) as exc:
            raise ValueError(f"autocast to {dtype} is not supported on {device_type}: {exc}") from exc
    try:
        yield
    finally:
        context.__exit__(None, None, None)
