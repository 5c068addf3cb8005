"""Small building blocks shared by the network and the diffusion code."""

import inspect
import math
from typing import Iterable

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
    """A 1D convolution (attention projections) or a 2D one (everything else)."""
    return {1: nn.Conv1d, 2: nn.Conv2d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D or 2D average pooling."""
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d}[dims](*args, **kwargs)


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
