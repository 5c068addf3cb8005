import numpy as np
import pytest
import torch

from diffiner.pipeline import Refiner, crossfade_join, segment_bounds, segment_seed

from conftest import speech_like, tiny_model_and_diffusion


def make_refiner(**kwargs):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim4")
    settings = dict(max_dur=10.0, segment_overlap=1.0)
    settings.update(kwargs)
    return Refiner(model, diffusion, **settings)


def pair(seconds, seed=0, rate=16000):
    clean = speech_like(seconds, rate, seed)
    noisy = clean + 0.05 * np.random.default_rng(seed + 100).standard_normal(clean.size).astype(np.float32)
    return noisy, 0.9 * clean


def test_segment_bounds_cover_everything_with_equal_lengths():
    assert segment_bounds(1000, 4000, 500) == [(0, 1000)]
    bounds = segment_bounds(25 * 16000, 4 * 16000, 16000)
    assert bounds[0][0] == 0 and bounds[-1][1] == 25 * 16000
    assert len({end - start for start, end in bounds}) == 1
    for (s0, e0), (s1, _) in zip(bounds, bounds[1:]):
        assert e0 - s1 >= 16000


def test_crossfade_join_reconstructs_a_signal_cut_into_windows():
    signal = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    bounds = segment_bounds(10000, 3000, 600)
    joined = crossfade_join([signal[s:e] for s, e in bounds], bounds, 10000, 600)
    np.testing.assert_allclose(joined, signal, atol=1e-5)


def test_segment_seed_depends_only_on_identity():
    assert segment_seed(0, "a.wav", 0, 0) == segment_seed(0, "a.wav", 0, 0)
    assert len({segment_seed(0, "a.wav", 0, 0), segment_seed(1, "a.wav", 0, 0), segment_seed(0, "b.wav", 0, 0),
                segment_seed(0, "a.wav", 1, 0), segment_seed(0, "a.wav", 0, 1)}) == 5


def test_batch_invariance_alone_versus_in_a_batch_of_three():
    # Float32's bound: under bf16 (the default on CPUs with native bf16) another batch size
    # changes the network's rounding at bf16's 8 bits.
    refiner = make_refiner(eta_c=0.3, batch_size=3, precision="fp32")
    prepared = [refiner.prepare(*pair(1.0, seed), 16000, key=f"f{seed}.wav") for seed in range(3)]
    segments = [p.segments[0] for p in prepared]
    assert len({s.width for s in segments}) == 1
    together = refiner.run_segments(segments)
    refiner.batch_size = 1
    alone = refiner.run_segments(segments[1:2])[0]
    scale = together[1].abs().max().item()
    assert (alone - together[1]).abs().max().item() <= 1e-5 * scale


def test_padding_only_to_the_network_multiple_past_one_frame_after_the_signal():
    refiner = make_refiner()
    prepared = refiner.prepare(*pair(0.5), 16000)
    frames = 1 + 8000 // 256  # 32, already a multiple of 8: one more frame still goes past the signal
    assert prepared.segments[0].width == refiner.multiple * -(-(frames + 1) // refiner.multiple) == 40
    assert prepared.segments[0].width - (frames + 1) < refiner.multiple


@pytest.mark.parametrize("samples", [1, 2, 100, 255, 256, 257])
def test_recordings_too_short_for_the_stft_are_refined_at_their_own_length(samples):
    refiner = make_refiner()
    rng = np.random.default_rng(samples)
    noisy = (0.3 * rng.standard_normal(samples)).astype(np.float32)
    processed = 0.9 * noisy
    out = refiner.refine(noisy, processed, 16000)
    assert out.shape == (samples,) and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out).max() > 0
    # Two channels of a few samples: the shape alone does not tell the layout (see test_api).
    stereo = refiner.refine(np.stack([noisy, -noisy]), np.stack([processed, -processed]), 16000,
                            layout="channels_first")
    assert stereo.shape == (2, samples)
    assert refiner.prepare(noisy, processed, 16000).segments[0].width == refiner.padded_width(samples)


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
@pytest.mark.parametrize("samples", [1, 3, 40, 700])
def test_short_recordings_at_other_rates_keep_their_length(rate, samples):
    refiner = make_refiner()
    noisy = (0.3 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
    out = refiner.refine(noisy, 0.9 * noisy, rate)
    assert out.shape == (samples,) and np.isfinite(out).all()
    at16k = refiner.refine(noisy, 0.9 * noisy, rate, output_sample_rate=16000)
    # Never empty: one sample at 48 kHz is a third of a sample at 16 kHz.
    assert at16k.shape == (max(1, round(samples * 16000 / rate)),) and np.isfinite(at16k).all()


@pytest.mark.parametrize("rate", [8000, 44100])
def test_api_returns_the_input_length_and_shape_at_any_rate(rate):
    refiner = make_refiner(max_dur=1.0, segment_overlap=0.25)
    noisy, processed = pair(2.3, rate=rate)
    out = refiner.refine(noisy, processed, rate)
    assert out.shape == processed.shape and out.dtype == np.float32 and np.isfinite(out).all()
    stereo = refiner.refine(np.stack([noisy, noisy[::-1]]), np.stack([processed, processed[::-1]]), rate)
    assert stereo.shape == (2, processed.size)
    assert not np.allclose(stereo[0], stereo[1])
    at16k = refiner.refine(noisy, processed, rate, output_sample_rate=16000)
    assert at16k.shape == (round(processed.size * 16000 / rate),)


def test_api_is_deterministic_given_seed_and_key():
    refiner = make_refiner()
    noisy, processed = pair(0.7)
    a = refiner.refine(noisy, processed, 16000, seed=3, key="x")
    assert np.array_equal(a, refiner.refine(noisy, processed, 16000, seed=3, key="x"))
    assert not np.array_equal(a, refiner.refine(noisy, processed, 16000, seed=4, key="x"))


def test_api_rejects_bad_input_clearly():
    refiner = make_refiner()
    with pytest.raises(ValueError, match="lengths differ"):
        refiner.refine(np.zeros(100), np.zeros(120), 16000)
    with pytest.raises(ValueError, match="NaN"):
        refiner.refine(np.full(100, np.nan), np.zeros(100), 16000)
    with pytest.raises(ValueError, match="precision"):
        make_refiner(precision="fp8")


def test_from_checkpoint_loads_and_names_mismatched_settings(tiny_checkpoint):
    from conftest import TINY

    refiner = Refiner.from_checkpoint(tiny_checkpoint, device="cpu", timestep_respacing="ddim4", model_settings=TINY)
    assert refiner.device.type == "cpu"
    with pytest.raises(ValueError, match="do not fit the model settings"):
        Refiner.from_checkpoint(tiny_checkpoint, device="cpu", model_settings=dict(TINY, num_channels=64))
    torch.save({"module." + k: v for k, v in torch.load(tiny_checkpoint).items()}, tiny_checkpoint)
    Refiner.from_checkpoint(tiny_checkpoint, device="cpu", timestep_respacing="ddim4", model_settings=TINY)


def test_the_respacing_is_a_sampler_setting_never_a_model_setting(tiny_checkpoint):
    from conftest import TINY

    def steps(**kwargs):
        return len(Refiner.from_checkpoint(tiny_checkpoint, device="cpu", **kwargs).diffusion.timestep_map)

    assert steps(model_settings=TINY, timestep_respacing="ddim5") == 5
    assert steps(model_settings=TINY) == 200  # the published sampler
    with pytest.raises(ValueError, match="sampler setting"):
        steps(model_settings=dict(TINY, timestep_respacing="ddim4"))


def test_settings_as_one_object_or_as_keywords_are_the_same():
    from diffiner.pipeline import BatchSettings, MethodSettings, RefinerSettings

    settings = RefinerSettings(method=MethodSettings(method="diffiner", etas={"eta_a": 0.5}), batching=BatchSettings(batch_size=3))
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim4")
    assert Refiner(model, diffusion, settings).settings == make_refiner(method="diffiner", eta_a=0.5,
                                                                        batch_size=3).settings
    with pytest.raises(TypeError, match="not both"):
        Refiner(model, diffusion, settings, batch_size=3)


def test_a_frame_budget_of_auto_is_refused_with_the_way_to_get_it():
    with pytest.raises(ValueError, match="auto_max_batch_frames"):
        make_refiner(max_batch_frames="auto")


def test_frame_budget_sizes_batches_per_width():
    refiner = make_refiner(batch_size=2, max_batch_frames=100)
    assert refiner.batch_size_for(16) == 6 and refiner.batch_size_for(48) == 2 and refiner.batch_size_for(200) == 1
    prepared = [refiner.prepare(*pair(seconds, seed), 16000) for seed, seconds in
                enumerate([0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.7, 0.7, 0.7])]
    segments = [p.segments[0] for p in prepared]
    batches = []
    run_batch = refiner.run_batch

    def recorded(batch, progress=False):
        batches.append([seg.width for seg in batch])
        return run_batch(batch, progress)

    refiner.run_batch = recorded
    assert len(refiner.run_segments(segments)) == len(segments)
    assert sorted(len(b) for b in batches) == sorted([6, 1, 2, 1])
    assert all(len(set(b)) == 1 and sum(b) <= 100 for b in batches)
