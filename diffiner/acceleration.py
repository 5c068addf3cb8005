"""How the network is executed: precision, memory format, compilation, batch memory budget.

None of this changes the diffusion arithmetic: whatever runs inside, the wrapper hands float32
back, so alphas, the refiner update and the noise map always stay in float32.
"""

import logging
from typing import Optional

import torch

from .nn import autocast

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class NetworkRunner(torch.nn.Module):
    """Calls the network under autocast (and channels-last) and returns float32."""

    def __init__(self, model: torch.nn.Module, precision: str = "fp32", channels_last: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.model = model
        self.dtype = PRECISIONS[precision]
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device.type, self.dtype):
            return self.model(x, timesteps).float().contiguous()


def build_runner(model: torch.nn.Module, precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False, cuda_graphs: bool = False):
    """The callable the sampler uses for the network, with the requested accelerations.

    `cuda_graphs` captures each step's network call as a CUDA graph through
    torch.compile(mode="reduce-overhead"), so it implies `compile`.
    """
    runner = NetworkRunner(model, precision, channels_last)
    if compile or cuda_graphs:
        if not hasattr(torch, "compile"):
            raise ValueError(f"--compile needs torch >= 2.0 (this is {torch.__version__})")
        mode = "reduce-overhead" if cuda_graphs else None
        return torch.compile(runner, mode=mode)
    return runner


def estimate_max_batch_frames(runner, model: torch.nn.Module, device: torch.device, width: int,
                              memory_fraction: float = 0.8) -> Optional[int]:
    """Frames per batch that fit in `memory_fraction` of the free GPU memory; None off CUDA.

    Measures the peak memory of one network call on a (1, C, 256, width) input and scales it:
    activation memory grows linearly with the frame count when attention runs through
    memory-efficient kernels.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = torch.zeros(1, model.in_channels, 256, width, device=device)
    with torch.no_grad():
        runner(x, torch.zeros(1, dtype=torch.long, device=device))
    torch.cuda.synchronize(device)
    per_frame = max(torch.cuda.max_memory_allocated(device) - before, 1) / width
    free, _ = torch.cuda.mem_get_info(device)
    frames = int(free * memory_fraction / per_frame)
    logger.info("memory budget: %.1f MB per frame, %d frames per batch", per_frame / 2 ** 20, frames)
    return max(frames, width)
