"""Reading weights: the one place where refining, training and sampling load a checkpoint.

A checkpoint is a plain state dict of the UNet, as published (`pretrained_diffiner_onVB.pt`) or as
written by training (`modelNNNNNN.pt`, `ema_<rate>_NNNNNN.pt`). The network is built from its
settings first, then the weights are loaded strictly, so settings that do not match the file are
reported instead of silently ignored.
"""

from typing import Any, Dict, Optional, Tuple

import torch

from .respace import SpacedDiffusion
from .script_util import create_model_and_diffusion, model_and_diffusion_defaults
from .unet import UNetModel

DDP_PREFIX = "module."  # what DistributedDataParallel prepends to every key


def load_state_dict(path: str) -> Dict[str, Any]:
    """A dict saved with torch.save, read onto the CPU; DDP's "module." prefix is removed.

    Raises ValueError naming the file when it does not hold a dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        state = torch.load(path, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in state.items()}


def load_weights(model: torch.nn.Module, path: str, settings: Optional[Dict[str, Any]] = None) -> None:
    """Load the state dict at `path` into `model` strictly.

    Raises ValueError naming the file (and the main `settings`, when given) when they do not fit.
    """
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as exc:
        described = ""
        if settings:
            described = (f" (image_size={settings['image_size']}, num_channels={settings['num_channels']}, "
                         f"num_res_blocks={settings['num_res_blocks']}, ...)")
        raise ValueError(f"{path}: the weights do not fit the model settings{described}: {exc}") from exc


def load_model(model_path: str, model_settings: Optional[Dict[str, Any]] = None
               ) -> Tuple[UNetModel, SpacedDiffusion]:
    """(model, diffusion) built from `model_settings` (defaults: the published configuration)
    with the weights at `model_path`, on the CPU."""
    settings = model_and_diffusion_defaults()
    settings.update(model_settings or {})
    model, diffusion = create_model_and_diffusion(**settings)
    load_weights(model, model_path, settings)
    return model, diffusion
