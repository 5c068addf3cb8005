"""The package's shape: public import paths, the README's Python API, dependency direction and the
commands' help."""

import ast
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, speech_like

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffiner")

# guided-diffusion's modules, where people who know it look for them.
UPSTREAM_MODULES = ["unet", "nn", "gaussian_diffusion", "respace", "losses", "script_util", "train_util",
                    "dist_util", "logger"]


@pytest.mark.parametrize("name", UPSTREAM_MODULES)
def test_guided_diffusion_modules_keep_their_upstream_names(name):
    importlib.import_module(f"diffiner.{name}")


def test_names_the_published_checkpoint_tooling_imports():
    from diffiner.gaussian_diffusion import GaussianDiffusion
    from diffiner.refiner import refine
    from diffiner.respace import SpacedDiffusion, space_timesteps
    from diffiner.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from diffiner.unet import UNetModel

    model, diffusion = create_model_and_diffusion(**model_and_diffusion_defaults())
    assert isinstance(model, UNetModel) and isinstance(diffusion, SpacedDiffusion)
    assert isinstance(diffusion, GaussianDiffusion) and callable(refine) and space_timesteps(40, "ddim4")


def test_readme_python_api(tiny_checkpoint):
    from diffiner.pipeline import Refiner

    refiner = Refiner.from_checkpoint(tiny_checkpoint, model_settings=TINY, timestep_respacing="ddim2",
                                      method="diffiner", eta_a=0.5, precision="fp32", device="cpu")
    noisy = speech_like(0.6, 22050)
    refined = refiner.refine(noisy, 0.9 * noisy, 22050)
    assert refined.shape == noisy.shape and refined.dtype == np.float32 and np.isfinite(refined).all()
    assert refiner.etas == {"eta_a": 0.5, "eta_b": 0.9}
    with pytest.raises(TypeError, match="unknown refiner settings"):
        Refiner.from_checkpoint(tiny_checkpoint, model_settings=TINY, eta_z=0.5, device="cpu")


def _imports(path):
    """Absolute module names imported by a file of the package (relative imports resolved)."""
    package = os.path.relpath(os.path.dirname(path), os.path.dirname(PACKAGE)).replace(os.sep, ".")
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("diffiner")}


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, "."), path


def test_dependencies_point_one_way():
    """Commands depend on the library; nothing in the library depends on a command, and the
    diffusion core depends on neither the pipeline nor the applications."""
    core = {f"diffiner.{name}" for name in UPSTREAM_MODULES + ["refiner", "spectrogram", "schedule_sampler",
                                                               "seeding", "checkpoints", "acceleration", "flags",
                                                               "errors"]}
    core |= {module for module, _ in _modules() if module.startswith("diffiner.methods")}
    applications = ("diffiner.pipeline", "diffiner.corpus", "diffiner.training", "diffiner.sampling",
                    "diffiner.commands", "diffiner.evaluation", "diffiner.audio.enhancers", "diffiner.audio.mixing")
    for module, path in _modules():
        imported = _imports(path)
        if not module.startswith("diffiner.commands"):
            assert not any(i.startswith("diffiner.commands") for i in imported), (module, imported)
        if module in core:
            assert not any(i.startswith(applications) for i in imported), (module, imported)


COMMANDS = ["diffiner.commands.refine", "diffiner.commands.train", "diffiner.commands.sample_prior",
            "diffiner.commands.evaluate", "diffiner.commands.enhance", "diffiner.commands.resample_audio",
            "diffiner.commands.make_noisy_set", "diffiner.commands.pretrained"]


@pytest.mark.slow  # one Python subprocess per command
@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_top_down_without_meaningless_defaults(command):
    result = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "(default: None)" not in text and "(default: False)" not in text
    if "model and diffusion" in text:
        # The settings a user changes come first; the model settings, which must match the
        # checkpoint, come last in their own group.
        model_group = text.index("model and diffusion")
        assert text.index("--seed") < model_group < text.index("--num-channels")
