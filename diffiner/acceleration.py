"""How the network is executed: precision, memory format, compilation, batch memory budget,
and recognising (and recovering from) running out of GPU memory.

The one place where precision is decided, for refining, training and sampling alike: the
network itself always computes in whatever dtype it is handed, and `NetworkRunner` calls it under
autocast. None of this changes the diffusion arithmetic: the runner hands float32 back, so
alphas, the refiner update and the noise map always stay in float32.
"""

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# How torch words a failed CUDA allocation: the caching allocator's message (the only form in
# torch < 1.13, as a plain RuntimeError; later as torch.cuda.OutOfMemoryError) and the CUDA runtime's
# own error, raised when memory runs out outside the allocator (cuDNN or cuBLAS workspaces).
_OUT_OF_MEMORY_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory")


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
        autocast_dtype(self.precision)  # refuses an unknown precision when the settings are made

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision name (None for fp32); ValueError for an unknown name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


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
        self.model = model
        self.dtype = autocast_dtype(precision)
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

    Measures the peak memory of one network call on 1 and on 2 segments of `width` frames and
    extrapolates (`frames_that_fit`): activation memory grows linearly with the frame count when
    attention runs through memory-efficient kernels.
    """
    if device.type != "cuda":
        return None
    peak_one, peak_two = (_peak_memory_of_call(runner, model, device, batch, width) for batch in (1, 2))
    free, _ = torch.cuda.mem_get_info(device)
    frames = frames_that_fit(peak_one, peak_two, width, free, memory_fraction)
    per_frame, fixed = memory_model(peak_one, peak_two, width)
    logger.info("memory budget: %.1f MB fixed + %.2f MB per frame: %d frames per batch",
                fixed / 2 ** 20, per_frame / 2 ** 20, frames)
    return frames


def _peak_memory_of_call(runner, model: torch.nn.Module, device: torch.device, batch: int, width: int) -> int:
    """Bytes allocated at the peak of one network call on (batch, C, 256, width), beyond what was
    allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x = torch.zeros(batch, model.in_channels, 256, width, device=device)
    with torch.no_grad():
        runner(x, torch.zeros(batch, dtype=torch.long, device=device))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def memory_model(peak_one: int, peak_two: int, width: int) -> Tuple[float, float]:
    """(bytes per frame, fixed bytes) of a network call, from its peak memory on one and on two
    segments of `width` frames.

    Memory is modelled as fixed + frames x per-frame. Dividing the one-segment peak by its frames
    would count the fixed part (cuDNN workspaces, the model's own buffers) once per frame, which at
    narrow widths makes the budget several times too small.
    """
    per_frame = (peak_two - peak_one) / width
    if per_frame > 0:
        return per_frame, max(peak_one - per_frame * width, 0.0)
    # The second segment cost nothing measurable: fall back to the one-segment ratio.
    return max(peak_one, 1) / width, 0.0


def frames_that_fit(peak_one: int, peak_two: int, width: int, free: int, memory_fraction: float) -> int:
    """Frames per batch that fit in `memory_fraction` of `free` bytes (see `memory_model`), at
    least one segment's worth."""
    per_frame, fixed = memory_model(peak_one, peak_two, width)
    return max(int((free * memory_fraction - fixed) / per_frame), width)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc`, or the exception it was raised from (torch.compile wraps errors with
    `raise ... from`), is a CUDA out-of-memory error in the form of any supported torch version."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)  # torch >= 1.13
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if oom_type is not None and isinstance(exc, oom_type):
            return True
        if isinstance(exc, RuntimeError) and str(exc).startswith(_OUT_OF_MEMORY_MESSAGES):
            return True
        exc = exc.__cause__
    return False


def release_cached_memory(device: torch.device) -> None:
    """Return the blocks the CUDA caching allocator holds to the device, so that a retry after an
    out-of-memory error starts from unfragmented memory; nothing off CUDA."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
