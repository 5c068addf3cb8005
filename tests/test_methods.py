"""Reverse processes as plug-ins: the registry, the CLI's --method, and a method from outside."""

import os
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile as sf
import torch

from diffiner.commands.refine import main
from diffiner.methods import (Etas, ReverseProcess, Step, build_method, get_method, method_names,
                              register_method)
from diffiner.methods import _REGISTRY as REGISTRY
from diffiner.refiner import refine
from diffiner.seeding import torch_generator

from conftest import speech_like, tiny_cli_flags, tiny_model_and_diffusion, write_wav
from tolerances import reordering_atol


@dataclass(frozen=True)
class ToyEtas(Etas):
    eta_keep: float = 0.5


class KeepTheObservation(ReverseProcess):
    """A toy method: x_{i-1} = a * (eta_keep * y + (1 - eta_keep) * x0), no fresh noise."""

    name = "toy-keep"
    etas_type = ToyEtas
    description = "test method"

    def step(self, step: Step) -> torch.Tensor:
        keep = self.etas.eta_keep
        return step.a * (keep * step.y + (1 - keep) * step.x0)


@pytest.fixture
def toy_method():
    register_method(KeepTheObservation)
    yield KeepTheObservation
    REGISTRY.pop(KeepTheObservation.name)


@pytest.fixture
def pair(tmp_path):
    clean = speech_like(0.7, 16000, seed=3)
    noise = 0.05 * np.random.default_rng(4).standard_normal(clean.size).astype(np.float32)
    write_wav(str(tmp_path / "noisy" / "a.wav"), clean + noise, 16000)
    write_wav(str(tmp_path / "proc" / "a.wav"), 0.9 * clean, 16000)
    return str(tmp_path)


def run(root, checkpoint, *extra):
    return main(["--root-noisy", os.path.join(root, "noisy"), "--root-proc", os.path.join(root, "proc"),
                 "--model-path", checkpoint, "--no-gpu", "--no-progress", *tiny_cli_flags("ddim4"), *extra])


def test_builtin_methods_are_registered_with_their_papers_defaults():
    assert method_names()[:3] == ["diffiner+", "diffiner", "ddim"]
    assert build_method("diffiner+").etas.as_dict() == dict(eta_a=0.4, eta_b=0.6, eta_c=0.0, eta_d=0.6)
    assert build_method("diffiner", {"eta_b": 0.3}).etas.as_dict() == dict(eta_a=0.9, eta_b=0.3)
    with pytest.raises(ValueError, match="unknown method 'ddrm'; choose one of: diffiner\\+, diffiner, ddim"):
        get_method("ddrm")
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (KeepTheObservation,), {"name": "diffiner"}))


def test_method_diffiner_equals_simple_diffiner_bit_for_bit(pair, tiny_checkpoint):
    assert run(pair, tiny_checkpoint, "--simple-diffiner", "--output-dir", os.path.join(pair, "simple")) == 0
    assert run(pair, tiny_checkpoint, "--method", "diffiner", "--output-dir", os.path.join(pair, "named")) == 0
    with open(os.path.join(pair, "simple", "a.wav"), "rb") as a, open(os.path.join(pair, "named", "a.wav"), "rb") as b:
        assert a.read() == b.read()
    # Not a trivially equal pair: Diffiner+ makes other audio.
    assert run(pair, tiny_checkpoint, "--output-dir", os.path.join(pair, "plus")) == 0
    assert not np.array_equal(sf.read(os.path.join(pair, "plus", "a.wav"))[0],
                              sf.read(os.path.join(pair, "named", "a.wav"))[0])


def test_an_outside_method_runs_through_the_command_line(pair, tiny_checkpoint, toy_method, capsys):
    assert run(pair, tiny_checkpoint, "--method", "toy-keep", "--etas", "1.0") == 0
    out_dir = os.path.join(pair, "proc", "toy-keep_etaKEEP=1.0")
    refined, rate = sf.read(os.path.join(out_dir, "a.wav"))
    noisy, _ = sf.read(os.path.join(pair, "noisy", "a.wav"))
    # eta_keep 1 keeps the observation: the output is the noisy recording, up to the STFT round
    # trip without its DC bin and 16-bit rounding.
    assert rate == 16000 and refined.shape == noisy.shape
    assert np.abs(refined - noisy).max() < 0.02 * np.abs(noisy).max()
    with open(os.path.join(out_dir, "config.yml")) as f:
        config = f.read()
    assert "method: toy-keep" in config and "eta_keep: 1.0" in config


def test_an_unknown_method_exits_2_and_lists_the_choices(pair, tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(pair, tiny_checkpoint, "--method", "ddrm")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ddrm" in err and "diffiner+" in err and "ddim" in err


def test_simple_diffiner_contradicting_another_method_is_refused(pair, tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(pair, tiny_checkpoint, "--simple-diffiner", "--method", "ddim")
    assert exit_.value.code == 2 and "contradicts --method ddim" in capsys.readouterr().err


def test_the_ddim_method_is_the_diffusions_own_ddim_sampler():
    """Ignoring the observation, `ddim` with eta 0 follows the same chain as the DDIM sampling
    loop that `diffiner-sample` uses, from the same starting noise."""
    model, diffusion = tiny_model_and_diffusion(diffusion_steps=100, timestep_respacing="ddim5")
    shape = (2, 2, 16, 16)
    observation = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    refined = refine(model, diffusion, observation, torch.ones(2, 1, 16, 16), method="ddim",
                     generator=torch_generator(7, torch.device("cpu")))
    start = torch.randn(shape, generator=torch_generator(7, torch.device("cpu")))
    sampled = diffusion.ddim_sample_loop(model, shape, noise=start, eta=0.0)
    # Five steps, each of a handful of float32 operations on values of order 1 to 10.
    atol = reordering_atol(torch.float32, 5 * 8, sampled.abs().max().item())
    torch.testing.assert_close(refined, sampled, rtol=0, atol=atol)
