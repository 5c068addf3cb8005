"""Small building blocks shared by the network and the diffusion code."""

import inspect
import math
from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype (stable under fp16/bf16).

    A bf16/fp16 input is normalised in its own dtype where torch has the mixed kernel (input in
    the reduced dtype, float32 weights; its mean and variance accumulate in float32): the same
    statistics as converting to float32 first, without the two conversions of the activations
    (`mixed_group_norm`). Autocast is off around it because CUDA's autocast would convert the
    input to float32 again (group_norm is on its float32 list). Float32 runs as it always has.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and mixed_group_norm(x.device.type, x.dtype):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x.float()).type(x.dtype)


_MIXED_GROUP_NORM: Dict[Tuple[str, torch.dtype], bool] = {}


def mixed_group_norm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch normalises a `dtype` input with float32 weights on `device_type`
    (torch >= 2.0 on the CPU and CUDA; older versions refuse mixed dtypes); tried once."""
    key = (device_type, dtype)
    if key not in _MIXED_GROUP_NORM:
        try:
            x = torch.ones(1, 2, 2, dtype=dtype, device=device_type)
            one = torch.ones(2, device=device_type)
            with torch.autocast(device_type, enabled=False):
                _MIXED_GROUP_NORM[key] = F.group_norm(x, 1, one, one).dtype == dtype
        except (RuntimeError, TypeError):
            _MIXED_GROUP_NORM[key] = False
    return _MIXED_GROUP_NORM[key]


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
