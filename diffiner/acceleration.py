"""How the network is executed: precision, memory format, compilation, batch memory budget,
and recognising (and recovering from) running out of GPU memory.

The one place where precision is decided, for refining, training and sampling alike: the
network itself always computes in whatever dtype it is handed, and `NetworkRunner` calls it under
autocast. None of this changes the diffusion arithmetic: the runner hands float32 back, so
alphas, the refiner update and the noise map always stay in float32.
"""

import contextlib
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import FrozenSet, Iterator, Optional, Tuple

import torch

from .flags import PRECISION_FLAGS, Flag, flags_of, setting, str2bool
from .spectrogram import front_end_of
from .unet import QKVAttention

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# The precision (and, with channels_last None, the memory format) chosen per device by
# `default_execution` when the network is built.
AUTO = "auto"
# CPU features that run bfloat16 matrix products natively (x86 /proc/cpuinfo flag names): with one
# of them, bf16 autocast plus channels-last ran the published-size forward 2x (AVX512-BF16, a
# contended run) to 7x (AMX) faster than float32 (BENCHMARKS.md, "CPU: the published-size forward
# against the CPU's peak"), and the demo model's refined audio stays within the tolerance of
# tests/test_cpu_defaults.py.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# How torch words a failed CUDA allocation: the caching allocator's message (the only form in
# torch < 1.13, as a plain RuntimeError; later as torch.cuda.OutOfMemoryError) and the CUDA runtime's
# own error, raised when memory runs out outside the allocator (cuDNN or cuBLAS workspaces).
_OUT_OF_MEMORY_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory")
# How the other errors of the GPU and its libraries read: the CUDA runtime's ("CUDA error: an
# illegal memory access was encountered"), cuDNN's, cuBLAS's, cuFFT's. torch raises them as
# RuntimeError (torch >= 2.8: torch.AcceleratorError, a RuntimeError) with these words in them.
_DEVICE_ERROR_MARKERS = ("CUDA error", "CUDNN_STATUS", "cuDNN error", "CUBLAS_STATUS", "cuBLAS error",
                         "CUFFT_", "cuFFT error", "CUSOLVER_STATUS", "CUSPARSE_STATUS")


@dataclass(frozen=True)
class ExecutionSettings:
    """How to run the network: precision ("fp32", "bf16", "fp16"), memory format, compilation.

    `cuda_graphs` captures each step's network call as a CUDA graph through
    torch.compile(mode="reduce-overhead"), so it implies `compile`.
    """

    # Precision changes the audio; the others change it by float rounding at most. "auto" and
    # None are chosen per device when the network is built (`resolved`).
    precision: str = AUTO
    channels_last: Optional[bool] = setting(None, "run the network in channels-last memory format (default: "
                                                  "chosen per device for refining and sampling, off for training)",
                                            affects_output=False, type=str2bool)
    compile: bool = setting(False, "torch.compile the network (widths bucketed to 128 frames)",
                            affects_output=False)
    cuda_graphs: bool = setting(False, "capture each step's network call as a CUDA graph (torch.compile mode "
                                       "reduce-overhead)", affects_output=False)

    def __post_init__(self):
        if self.precision != AUTO:
            autocast_dtype(self.precision)  # refuses an unknown precision when the settings are made

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs

    def resolved(self, device: torch.device) -> "ExecutionSettings":
        """These settings as they run on `device`: "auto" precision takes the device's defaults
        (`default_execution`) for the precision and, unless given, the memory format. A precision
        given explicitly keeps the default layout unless channels_last is given too, so that
        `--precision fp32` runs exactly as float32 always has."""
        if self.precision != AUTO:
            return dataclasses.replace(self, channels_last=bool(self.channels_last))
        precision, channels_last = default_execution(device)
        return dataclasses.replace(self, precision=precision,
                                   channels_last=channels_last if self.channels_last is None else self.channels_last)


def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags as /proc/cpuinfo names them; empty where there is no such file
    (then `native_bf16_cpu` asks torch)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX-BF16),
    from /proc/cpuinfo, else from torch's own CPU checks where this torch has them."""
    flags = cpu_flags()
    if flags:
        return bool(flags & NATIVE_BF16_FLAGS)
    checks = [getattr(getattr(torch, "cpu", None), name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


# The oldest torch measured to run bfloat16 convolutions fast on a CPU with native bf16: 2.13 (the
# tiny test network, batch 2 x 64 frames: bf16 in channels-last 0.068 s per forward against
# float32's 0.197 s). torch 1.11 ran the same forward 44 times slower in bf16 than in float32
# (10.6 s against 0.24 s) on the same AVX512-BF16 CPU, so older releases keep float32.
FAST_CPU_BF16_TORCH = (2, 13)


def torch_release(version: str = torch.__version__) -> Tuple[int, int]:
    """(major, minor) of a torch version string such as "2.13.0+cpu"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def default_execution(device: torch.device) -> Tuple[str, bool]:
    """(precision, channels_last) that refining and sampling use on `device` unless told.

    A CPU with native bf16, under a torch that runs bf16 convolutions fast there
    (FAST_CPU_BF16_TORCH): bf16 autocast and channels-last (the fastest setting measured whose
    output stays within the tolerance of tests/test_cpu_defaults.py). Any other CPU: float32 in
    channels-last, which ran 11% faster than the default layout (BENCHMARKS.md, 2026-11-25
    17:08). CUDA and the rest: float32 in the default layout, until a GPU run has measured
    which setting is faster and faithful (BENCHMARKS.md, "GPU acceptance").
    """
    if torch.device(device).type == "cpu":
        fast_bf16 = native_bf16_cpu() and torch_release() >= FAST_CPU_BF16_TORCH
        return ("bf16", True) if fast_bf16 else ("fp32", True)
    return "fp32", False


def execution_flags(*names: str) -> Tuple[Flag, ...]:
    """The flags of the execution settings: --precision with its aliases, then those of `names`
    (all when none is named)."""
    return PRECISION_FLAGS + flags_of(ExecutionSettings, only=names or None)


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

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold autocast open around many network calls with unchanged weights (a reverse process).

        Autocast keeps the reduced-precision copies of the weights only while it is entered:
        entered and left around every call, it converts every weight again at every step (about
        one cast per layer per step). Inside this context the copies made by the first call are
        reused by the later ones. Autocast is switched off again until the next call, so the
        arithmetic between the calls stays float32 as it is without the session. The weights must
        not change inside (no training step).
        """
        if self.dtype is None:
            yield
            return
        device_type = next(self.model.parameters()).device.type
        # Nested autocast contexts keep the cache until the outermost one is left.
        with autocast(device_type, self.dtype), torch.autocast(device_type, enabled=False):
            yield


def build_runner(model: torch.nn.Module, settings: ExecutionSettings = ExecutionSettings()):
    """The callable the sampler uses for the network, with the requested accelerations
    (`settings` resolved for the model's device). On CUDA it also turns on cuDNN's search for
    the fastest convolution algorithm of each shape: a reverse process calls the network with
    the same shapes hundreds of times."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = settings.resolved(device)
    runner = NetworkRunner(model, settings.precision, settings.channels_last)
    if settings.compiled:
        if not hasattr(torch, "compile"):
            raise ValueError(f"--compile needs torch >= 2.0 (this is {torch.__version__})")
        return torch.compile(runner, mode="reduce-overhead" if settings.cuda_graphs else None)
    return runner


def network_session(network) -> "contextlib.AbstractContextManager":
    """The `NetworkRunner.session` of `network` (a runner, or torch.compile's wrapper of one),
    or a context that does nothing for any other callable."""
    runner = getattr(network, "_orig_mod", network)
    return runner.session() if isinstance(runner, NetworkRunner) else contextlib.nullcontext()


def backend_settings(device: torch.device) -> dict:
    """The library switches that decide which kernels run, for config.yml: torch's CPU threads;
    on CUDA also cuDNN's algorithm search and where TF32 may replace float32 arithmetic."""
    settings = {"threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        settings.update(cudnn_benchmark=torch.backends.cudnn.benchmark,
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                        tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return settings


# Several CUDA kernels that the network runs (cuDNN convolutions among them) index with 32-bit
# integers, and torch refuses or splits their tensors from 2**31 elements on, so no tensor of a
# batch may reach that size.
MAX_TENSOR_ELEMENTS = 2 ** 31 - 1
# The per-frame slope of the memory model is fitted over at least this many frames: at 32 frames
# per segment, one segment more adds about as much as cuDNN's workspace choice varies.
MIN_SLOPE_FRAMES = 128
# Calls of a new shape through torch.compile(mode="reduce-overhead"): CUDA graph trees run it
# once eagerly (warm-up), record it on the second call and replay it from the third.
GRAPH_WARM_UP_CALLS = 3


def estimate_max_batch_frames(runner, model: torch.nn.Module, device: torch.device, width: int,
                              memory_fraction: float = 0.8) -> Optional[int]:
    """Frames per batch that fit in `memory_fraction` of the free GPU memory, and that keep every
    tensor below 2**31 elements (`max_frames_by_elements`); None off CUDA.

    Measures the peak memory of one network call on the two batches of `measurement_batches` and
    extrapolates (`frames_that_fit`): activation memory grows linearly with the frame count when
    attention runs through memory-efficient kernels. The peaks are those of the eager network,
    because a compiled runner's first calls also hold compilation's and graph recording's
    transient buffers. A compiled runner is then warmed up at the larger batch before the free
    memory is read: the kernels it loads and, with --cuda-graphs, the graph pool that it records
    stay allocated for the rest of the run (empty_cache cannot release a graph pool), so the
    budget is sized from what is left after them. Graph trees share one pool between the graphs
    of all shapes, which reuse each other's memory, so a larger batch recorded later needs only
    the difference, and the budget is conservative by the pool of the warm-up batch.
    """
    if device.type != "cuda":
        return None
    eager = getattr(runner, "_orig_mod", runner)  # torch.compile's wrapper keeps the module here
    small, large = measurement_batches(width)
    measured_small, measured_large = ((n * width, _peak_memory_of_call(eager, model, device, n, width))
                                      for n in (small, large))
    if eager is not runner:
        _warm_up(runner, model, device, large, width)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    cap = max_frames_by_elements(model, width)
    frames = frames_that_fit(measured_small, measured_large, free, memory_fraction, width, cap)
    per_frame, fixed = memory_model(measured_small, measured_large)
    logger.info("memory budget: %.1f MiB fixed + %.2f MiB per frame, %.1f GiB free: %d frames per batch "
                "(tensor-size cap %d)", fixed / 2 ** 20, per_frame / 2 ** 20, free / 2 ** 30, frames, cap)
    return frames


def measurement_batches(width: int) -> Tuple[int, int]:
    """Segments per batch of the two calls whose peaks give the memory model: n and 2n, with n at
    least 2 and n segments at least MIN_SLOPE_FRAMES frames, so that the slope is measured over
    a difference far above the noise of the workspaces."""
    small = max(2, -(-MIN_SLOPE_FRAMES // width))
    return small, 2 * small


def _network_input(model: torch.nn.Module, device: torch.device, batch: int, width: int):
    return (torch.zeros(batch, model.in_channels, front_end_of(model).num_bins, width, device=device),
            torch.zeros(batch, dtype=torch.long, device=device))


def _peak_memory_of_call(runner, model: torch.nn.Module, device: torch.device, batch: int, width: int) -> int:
    """Bytes allocated at the peak of one network call on (batch, C, bins, width), beyond what was
    allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        runner(*_network_input(model, device, batch, width))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _warm_up(runner, model: torch.nn.Module, device: torch.device, batch: int, width: int) -> None:
    """Call a compiled runner until its graph for (batch, width) is compiled, recorded and replayed."""
    with torch.no_grad():
        for _ in range(GRAPH_WARM_UP_CALLS):
            runner(*_network_input(model, device, batch, width))
    torch.cuda.synchronize(device)


def largest_tensor_per_frame(model: torch.nn.Module, width: int) -> int:
    """An upper bound on the elements, per frame of a batch of `width`-frame segments, of the
    largest tensor a call of the UNet makes.

    At level l (downsampled 2**l times) a frame covers bins / 4**l positions (bins: the front-end's). The widest
    tensor there is a decoder block's input: the block's own or the upsampled lower level's
    channels concatenated with a skip of its own or the upper level's channels, so at most twice
    the widest of the three levels' channel counts; attention levels add the packed q, k, v
    (3x the channels) and, where attention is computed explicitly (torch without SDPA, or SDPA's
    math kernel), a heads x T x T weight over the T positions of a segment.
    """
    channels = [int(mult * model.model_channels) for mult in model.channel_mult]
    heads = max((m.n_heads for m in model.modules() if isinstance(m, QKVAttention)), default=0)
    largest = 0
    for level, ch in enumerate(channels):
        ds = 2 ** level
        rows = front_end_of(model).num_bins // ds
        widest = 2 * max(channels[max(level - 1, 0):level + 2])
        # The middle block attends at the lowest level whatever attention_resolutions says.
        attends = ds in model.attention_resolutions or level == len(channels) - 1
        if attends:
            widest = max(widest, 3 * ch)
            positions = rows * (width // ds)
            largest = max(largest, -(-heads * positions * positions // width))
        largest = max(largest, -(-widest * rows // ds))  # a frame is 1/ds of a column at this level
    return largest


def max_frames_by_elements(model: torch.nn.Module, width: int) -> int:
    """Frames per batch beyond which a tensor of the network would reach 2**31 elements."""
    return MAX_TENSOR_ELEMENTS // largest_tensor_per_frame(model, width)


def memory_model(small: Tuple[int, int], large: Tuple[int, int]) -> Tuple[float, float]:
    """(bytes per frame, fixed bytes) of a network call, from its peak memory at two batch sizes,
    each given as (frames, peak bytes).

    Memory is modelled as fixed + frames x per-frame. Dividing one peak by its frames would count
    the fixed part (cuDNN workspaces, the model's own buffers) once per frame, which at narrow
    widths makes the budget several times too small.
    """
    (frames_small, peak_small), (frames_large, peak_large) = small, large
    per_frame = (peak_large - peak_small) / (frames_large - frames_small)
    if per_frame > 0:
        return per_frame, max(peak_small - per_frame * frames_small, 0.0)
    # The larger batch cost nothing measurable: fall back to its own ratio.
    return max(peak_large, 1) / frames_large, 0.0


def frames_that_fit(small: Tuple[int, int], large: Tuple[int, int], free: int, memory_fraction: float,
                    width: int, max_frames: int) -> int:
    """Frames per batch that fit in `memory_fraction` of `free` bytes (see `memory_model`), at
    most `max_frames`, and at least one segment's worth (`width`)."""
    per_frame, fixed = memory_model(small, large)
    return max(min(int((free * memory_fraction - fixed) / per_frame), max_frames), width)


def _causes(exc: Optional[BaseException]) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from (torch.compile wraps errors with `raise ... from`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc`, or the exception it was raised from, is a CUDA out-of-memory error in the
    form of any supported torch version."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)  # torch >= 1.13
    return any((oom_type is not None and isinstance(e, oom_type))
               or (isinstance(e, RuntimeError) and str(e).startswith(_OUT_OF_MEMORY_MESSAGES))
               for e in _causes(exc))


def is_device_error(exc: BaseException) -> bool:
    """Whether `exc`, or the exception it was raised from, is an error of the GPU or of its
    libraries other than running out of memory (see `is_out_of_memory`): a failed kernel, an
    internal cuDNN or cuBLAS error. Such an error may concern one batch's shapes or one bad
    launch, so a caller may retry; the programming errors torch raises as RuntimeError too
    (mismatched devices or shapes) are not among them."""
    return not is_out_of_memory(exc) and any(
        isinstance(e, RuntimeError) and any(marker in str(e) for marker in _DEVICE_ERROR_MARKERS)
        for e in _causes(exc))


def release_cached_memory(device: torch.device) -> None:
    """Return the blocks the CUDA caching allocator holds to the device, so that a retry after an
    out-of-memory error starts from unfragmented memory; nothing off CUDA."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
