"""Running out of GPU memory while refining: halve the batch, keep the results, fail only what cannot fit;
and other errors of the GPU: retry one segment at a time, fail only the recordings they persist on.

No GPU is needed: the network is wrapped so that it raises CUDA's errors, in the forms torch raises
them, for batches above a size or segments above a width.
"""

import logging

import numpy as np
import pytest
import torch

from diffiner import pipeline
from diffiner.acceleration import is_device_error, is_out_of_memory, release_cached_memory
from diffiner.pipeline import Refiner, SegmentTooLarge

from conftest import speech_like, tiny_model_and_diffusion

MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity; "
           "75.01 GiB already allocated; 1.20 GiB free; 76.50 GiB reserved in total by PyTorch)")


def oom_forms():
    """The out-of-memory errors of the torch versions we support: torch >= 1.13 raises
    torch.cuda.OutOfMemoryError, torch 1.11 a RuntimeError with the same message."""
    forms = [pytest.param(lambda: RuntimeError(MESSAGE), id="RuntimeError (torch 1.11)")]
    if hasattr(torch.cuda, "OutOfMemoryError"):
        forms.append(pytest.param(lambda: torch.cuda.OutOfMemoryError(MESSAGE), id="torch.cuda.OutOfMemoryError"))
    return forms


class OutOfMemoryAbove(torch.nn.Module):
    """The network, failing like a GPU that holds at most `max_batch` segments, none wider than
    `max_width` frames. `events` records every call and whether it failed."""

    def __init__(self, network, error, max_batch=10 ** 6, max_width=10 ** 6, events=None):
        super().__init__()
        self.network, self.error = network, error
        self.max_batch, self.max_width = max_batch, max_width
        self.events = [] if events is None else events

    def forward(self, x, t):
        fails = x.shape[0] > self.max_batch or x.shape[-1] > self.max_width
        self.events.append(("fail" if fails else "call", x.shape[0], x.shape[-1]))
        if fails:
            raise self.error()
        return self.network(x, t)


def make_refiner(**settings):
    """A float32 refiner: the retried batches are compared with float32's bound (under bf16, the
    default on CPUs with native bf16, another batch size rounds at bf16's 8 bits)."""
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim2")
    return Refiner(model, diffusion, **{"precision": "fp32", **settings})


def pair(seconds, seed):
    clean = speech_like(seconds, 16000, seed)
    noisy = clean + 0.05 * np.random.default_rng(seed + 100).standard_normal(clean.size).astype(np.float32)
    return noisy, 0.9 * clean


def segments_of(refiner, seconds, count):
    return [seg for k in range(count)
            for seg in refiner.prepare(*pair(seconds, k), 16000, key=f"f{k}.wav").segments]


def attempts(events):
    """Batch sizes of the refinement attempts: the first network call of each (an attempt that
    succeeds makes one call per step, ddim2 here)."""
    sizes, k = [], 0
    while k < len(events):
        kind, size, _ = events[k]
        sizes.append(size if kind == "call" else -size)  # negative: failed
        k += 2 if kind == "call" else 1
    return sizes


def test_out_of_memory_halves_the_batch_keeps_the_size_and_changes_no_result(caplog):
    error = oom_forms()[-1].values[0]  # this torch's own form (both go through is_out_of_memory)
    reference = make_refiner(batch_size=1)
    segments = segments_of(reference, 0.05, 4)
    assert len({seg.width for seg in segments}) == 1
    width = segments[0].width
    expected = reference.run_segments(segments)

    refiner = make_refiner(batch_size=4)
    unbounded = refiner.run_segments(segments)
    wrapper = OutOfMemoryAbove(refiner.network, error, max_batch=1)
    refiner.network = wrapper
    with caplog.at_level(logging.WARNING, logger="diffiner.pipeline"):
        recovered = refiner.run_segments(segments)
    # 4 fails, 2 fails, then the learned size 1 is used for every later batch of this width.
    assert attempts(wrapper.events) == [-4, -2, 1, 1, 1, 1]
    assert refiner.fitting_batch == {width: 1} and refiner.batch_size_for(width) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{width} frames" in warnings[0].getMessage()
    # Same batches as a run that was given batch_size 1: bitwise the same; and within float32
    # rounding of the batch of 4 that never failed (each segment has its own generator).
    for got, want, whole in zip(recovered, expected, unbounded):
        assert torch.equal(got, want)
        assert (got - whole).abs().max() <= 1e-5 * whole.abs().max()

    wrapper.events.clear()
    again = refiner.run_segments(segments[:2])
    assert attempts(wrapper.events) == [1, 1]
    assert all(torch.equal(a, b) for a, b in zip(again, expected))


def test_cached_memory_is_released_after_each_out_of_memory_error_before_the_retry(monkeypatch):
    refiner = make_refiner(batch_size=3)
    events = []
    refiner.network = OutOfMemoryAbove(refiner.network, lambda: RuntimeError(MESSAGE), max_batch=1, events=events)
    monkeypatch.setattr(pipeline, "release_cached_memory", lambda device: events.append(("release", device)))
    refiner.run_segments(segments_of(refiner, 0.05, 3))
    kinds = [e[0] for e in events]
    assert kinds[:5] == ["fail", "release", "fail", "release", "call"]
    assert kinds.count("release") == 2 and events[1][1] == refiner.device


def test_release_cached_memory_empties_the_cuda_cache_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    release_cached_memory(torch.device("cpu"))
    assert calls == []
    release_cached_memory(torch.device("cuda", 0))
    assert calls == [1]


@pytest.mark.parametrize("error", oom_forms())
def test_a_segment_that_does_not_fit_alone_fails_its_recording_and_the_run_goes_on(error):
    refiner = make_refiner(batch_size=4, max_dur=0.15, segment_overlap=0.05)
    short = [(f"short{k}", refiner.prepare(*pair(0.05, k), 16000, key=f"short{k}")) for k in range(3)]
    long = ("long", refiner.prepare(*pair(0.35, 7), 16000, key="long"))
    assert len(long[1].segments) == 3 and long[1].segments[0].width > short[0][1].segments[0].width
    expected = {name: refiner.run_segments(prepared.segments) for name, prepared in short}

    wrapper = OutOfMemoryAbove(refiner.network, error, max_width=short[0][1].segments[0].width)
    refiner.network = wrapper
    results = list(refiner.refine_stream((name, prepared.segments) for name, prepared in short[:2] + [long] + short[2:]))
    by_name = {r.item: r for r in results}
    assert sorted(r.item for r in results) == ["long", "short0", "short1", "short2"]  # one result each
    failed = by_name["long"]
    assert failed.waves is None and isinstance(failed.error, SegmentTooLarge)
    assert f"({long[1].segments[0].width} frames) does not fit" in str(failed.error)
    assert "CUDA out of memory" in str(failed.error) and "\n" not in str(failed.error)
    for name, waves in expected.items():  # refined alone there, in a batch of two here
        assert by_name[name].error is None
        for got, want in zip(by_name[name].waves, waves):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    with pytest.raises(SegmentTooLarge, match="does not fit"):
        refiner.refine(*pair(0.35, 7), 16000)


DEVICE_ERRORS = ["cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
                 "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
                 "reported at some other API call",
                 "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k)`"]


@pytest.mark.parametrize("message", DEVICE_ERRORS)
def test_a_device_error_in_a_batch_is_retried_one_segment_at_a_time_with_the_same_results(message, caplog):
    reference = make_refiner(batch_size=1)
    segments = segments_of(reference, 0.05, 3)
    expected = reference.run_segments(segments)
    refiner = make_refiner(batch_size=3)
    wrapper = OutOfMemoryAbove(refiner.network, lambda: RuntimeError(message), max_batch=1)
    refiner.network = wrapper
    with caplog.at_level(logging.WARNING, logger="diffiner.pipeline"):
        got = refiner.run_segments(segments)
    assert attempts(wrapper.events) == [-3, 1, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))  # the same batches as batch_size 1
    assert refiner.fitting_batch == {}  # not taken for out of memory: later batches are full again
    assert any("retrying them one at a time" in r.getMessage() for r in caplog.records)


class FailingOn(torch.nn.Module):
    """The network, raising `message` for batches of more than one segment and for any batch
    whose first call `poisoned` says to fail (by its position among the attempts)."""

    def __init__(self, network, message, poisoned):
        super().__init__()
        self.network, self.message, self.poisoned = network, message, poisoned
        self.attempt, self.calls_left = -1, 0

    def forward(self, x, t):
        if self.calls_left == 0:  # the first call of an attempt (ddim2: two calls each)
            self.attempt += 1
            self.calls_left = 2
        if x.shape[0] > 1 or self.attempt in self.poisoned:
            self.calls_left = 0
            raise RuntimeError(self.message)
        self.calls_left -= 1
        return self.network(x, t)


def test_a_segment_the_device_fails_on_alone_too_fails_its_recording_only():
    refiner = make_refiner(batch_size=4)
    recordings = [(f"f{k}", refiner.prepare(*pair(0.05, k), 16000, key=f"f{k}").segments) for k in range(3)]
    expected = {name: make_refiner(batch_size=1).run_segments(segs) for name, segs in recordings}
    # Attempt 0: the batch of 3 fails; attempts 1-3: each alone, the second (f1) fails; attempt
    # 4: f1 retried no more, so nothing else runs.
    refiner.network = FailingOn(refiner.network, DEVICE_ERRORS[1], poisoned={2})
    results = {r.item: r for r in refiner.refine_stream(recordings)}
    assert sorted(results) == ["f0", "f1", "f2"]
    failed = results["f1"]
    assert failed.waves is None and isinstance(failed.error, pipeline.SegmentFailed)
    assert not isinstance(failed.error, SegmentTooLarge)
    text = str(failed.error)
    assert "again alone" in text and "illegal memory access" in text and "\n" not in text
    for name in ("f0", "f2"):
        assert results[name].error is None
        assert all(torch.equal(a, b) for a, b in zip(results[name].waves, expected[name]))
    assert refiner.network.attempt == 3  # f1 was tried twice: in its batch and once alone

    with pytest.raises(pipeline.SegmentFailed, match="again alone"):
        refiner.network.attempt, refiner.network.poisoned = -1, {0, 1, 2, 3}
        refiner.run_segments(recordings[0][1])


def test_programming_errors_of_the_network_are_neither_retried_nor_taken_for_out_of_memory():
    refiner = make_refiner(batch_size=4)
    wrapper = OutOfMemoryAbove(refiner.network, lambda: RuntimeError(
        "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"),
        max_batch=1)
    refiner.network = wrapper
    with pytest.raises(RuntimeError, match="same device"):
        refiner.run_segments(segments_of(refiner, 0.05, 2))
    assert attempts(wrapper.events) == [-2] and refiner.fitting_batch == {}


def test_is_device_error_recognises_gpu_library_errors_and_not_out_of_memory_or_programming_errors():
    for message in DEVICE_ERRORS:
        assert is_device_error(RuntimeError(message)) and not is_out_of_memory(RuntimeError(message))
    try:
        try:
            raise RuntimeError(DEVICE_ERRORS[0])
        except RuntimeError as cause:
            raise ValueError("compiled function failed") from cause
    except ValueError as wrapped:
        assert is_device_error(wrapped)
    assert not is_device_error(RuntimeError(MESSAGE))  # out of memory has its own handling
    assert not is_device_error(RuntimeError("CUDA error: out of memory"))
    assert not is_device_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_device_error(ValueError("CUDA error: an illegal memory access was encountered"))


def test_is_out_of_memory_recognises_every_form_and_nothing_else():
    assert is_out_of_memory(RuntimeError(MESSAGE))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported ..."))
    if hasattr(torch.cuda, "OutOfMemoryError"):
        assert is_out_of_memory(torch.cuda.OutOfMemoryError("anything"))
    try:  # how torch.compile reports an error of the code it runs
        try:
            raise RuntimeError(MESSAGE)
        except RuntimeError as cause:
            raise ValueError("compiled function failed") from cause
    except ValueError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not is_out_of_memory(MemoryError())  # host memory: halving a GPU batch would not help
    assert not is_out_of_memory(ValueError(MESSAGE))
