"""How the network is executed: precision, memory format, compilation, batch memory budget.

The one place where precision is decided, for refining, training and sampling alike: the
network itself always computes in whatever dtype it is handed, and `NetworkRunner` calls it under
autocast. None of this changes the diffusion arithmetic: the runner hands float32 back, so
alphas, the refiner update and the noise map always stay in float32.
"""

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExecutionSettings:
    """How to run the network: precision ("fp32", "bf16", "fp16"), memory format, compilation.

    `cuda_graphs` captures each step's network call as a CUDA graph through
    torch.compile(mode="reduce-overhead"), so it implies `compile`.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs


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


def build_runner(model: torch.nn.Module, settings: ExecutionSettings = ExecutionSettings()):
    """The callable the sampler uses for the network, with the requested accelerations."""
    runner = NetworkRunner(model, settings.precision, settings.channels_last)
    if settings.compiled:
        if not hasattr(torch, "compile"):
            raise ValueError(f"--compile needs torch >= 2.0 (this is {torch.__version__})")
        return torch.compile(runner, mode="reduce-overhead" if settings.cuda_graphs else None)
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
