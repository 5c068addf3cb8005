import os

import numpy as np
import pytest
import soundfile as sf

from diffiner.commands.sample_prior import main

from conftest import tiny_cli_flags
from fs_helpers import output_digest


@pytest.mark.slow
@pytest.mark.parametrize("method", [[], ["--use_ddim"]], ids=["ddpm", "ddim"])
def test_samples_are_playable_wavs_of_the_requested_length(tmp_path, tiny_checkpoint, capsys, method):
    out = str(tmp_path / "samples")
    # 0.55 s = 8800 samples = 35 frames: padded to 40 for the network, trimmed back after.
    assert main(["--model_path", tiny_checkpoint, "--num_samples", "3", "--batch_size", "2", "--seconds", "0.55",
                 "--output_dir", out, "--device", "cpu", "--precision", "fp32", *tiny_cli_flags("ddim3"),
                 *method]) == 0
    names = sorted(output_digest(out))
    assert names == ["sample_000.wav", "sample_001.wav", "sample_002.wav"]
    waves = []
    for name in names:
        info = sf.info(os.path.join(out, name))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 8800, "PCM_16")
        wave, _ = sf.read(os.path.join(out, name))
        assert np.isfinite(wave).all() and np.abs(wave).max() > 0
        waves.append(wave)
    assert not np.array_equal(waves[0], waves[1])
    assert "wrote 3 sample(s)" in capsys.readouterr().out

    # Sample i depends only on the seed and i, not on the batch it was drawn in (up to float32
    # rounding of batched convolutions, a 16-bit step or two; pinned to fp32, since in bf16 a
    # rounding differs by 2**-8 relative, and the default is bf16 on CPUs with native bf16).
    again = str(tmp_path / "again")
    assert main(["--model_path", tiny_checkpoint, "--num_samples", "2", "--batch_size", "1", "--seconds", "0.55",
                 "--output_dir", again, "--device", "cpu", "--precision", "fp32", *tiny_cli_flags("ddim3"),
                 *method]) == 0
    for name in ("sample_000.wav", "sample_001.wav"):
        np.testing.assert_allclose(sf.read(os.path.join(again, name))[0], sf.read(os.path.join(out, name))[0],
                                   atol=3 / 32768)


def test_wrong_model_settings_are_a_clear_error(tmp_path, tiny_checkpoint, capsys):
    assert main(["--model_path", tiny_checkpoint, "--output_dir", str(tmp_path), "--device", "cpu",
                 "--num_samples", "1", "--seconds", "0.1"]) == 2
    assert "do not fit the model settings" in capsys.readouterr().err
    assert main(["--model_path", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err


def test_sample_generators_live_on_the_sampling_device(monkeypatch):
    """Each sample's noise is drawn on the device that runs the network, as the refiner's is
    (issue 20, item 6); the device here is only named, the recorded generators are CPU ones."""
    import torch
    from diffiner import sampling
    asked = []
    real = sampling.stream_generator
    monkeypatch.setattr(sampling, "stream_generator",
                        lambda seed, stream, index, device="cpu": asked.append(str(device)) or real(seed, stream, index))

    class Recorder:
        def p_sample_loop(self, network, shape, device, generator):
            assert len(generator) == shape[0]
            return torch.zeros(shape)

    sampling.sample_spectrograms(None, Recorder(), [3, 4], (2, 8, 8), seed=0, use_ddim=False,
                                 device=torch.device("cuda:1"))
    assert asked == ["cuda:1", "cuda:1"]
