"""Model/diffusion construction from flat keyword settings, and argparse helpers.

The keyword names are guided-diffusion's, so that command lines and configuration files
written for the original code keep working.
"""

import argparse
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import UNetModel

# channel_mult per image_size when the user leaves it empty (spec §2).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the diffusion process (Diffiner trains with 4000 linear steps)."""
    return dict(
        learn_sigma=False,
        diffusion_steps=4000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of every model and diffusion setting: the published Diffiner configuration."""
    res = dict(
        image_size=256,
        image_channels=2,
        num_channels=128,
        num_res_blocks=3,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    return res


def create_model_and_diffusion(**kwargs) -> Tuple[UNetModel, SpacedDiffusion]:
    """Build (model, diffusion) from the settings of `model_and_diffusion_defaults()`.

    Unknown keywords raise TypeError; missing ones take the defaults.
    """
    settings = model_and_diffusion_defaults()
    unknown = set(kwargs) - set(settings)
    if unknown:
        raise TypeError(f"unknown model/diffusion settings: {sorted(unknown)}")
    settings.update(kwargs)
    diffusion_keys = diffusion_defaults().keys()
    model = create_model(**{k: v for k, v in settings.items() if k not in diffusion_keys or k == "learn_sigma"})
    diffusion = create_gaussian_diffusion(
        steps=settings["diffusion_steps"],
        learn_sigma=settings["learn_sigma"],
        noise_schedule=settings["noise_schedule"],
        use_kl=settings["use_kl"],
        predict_xstart=settings["predict_xstart"],
        rescale_timesteps=settings["rescale_timesteps"],
        rescale_learned_sigmas=settings["rescale_learned_sigmas"],
        timestep_respacing=settings["timestep_respacing"],
    )
    return model, diffusion


def parse_channel_mult(channel_mult, image_size: int) -> Tuple[float, ...]:
    """Channel multipliers from a "1,1,2,2,4,4" string, a sequence, or "" (size default)."""
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; set channel_mult")
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        values = [float(v) for v in channel_mult.split(",")]
        return tuple(int(v) if v.is_integer() else v for v in values)
    return tuple(channel_mult)


def attention_downsample_rates(attention_resolutions, image_size: int) -> Tuple[int, ...]:
    """Downsample rates for attention; the flag gives resolutions, rate = image_size // value."""
    if isinstance(attention_resolutions, str):
        values = [int(v) for v in attention_resolutions.split(",") if v.strip()]
    else:
        values = list(attention_resolutions)
    return tuple(image_size // v for v in values)


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    image_channels: int = 2,
    channel_mult="",
    learn_sigma: bool = False,
    class_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions="16,8",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
) -> UNetModel:
    """Build the UNet for spectrograms of `image_channels` channels (real, imaginary)."""
    return UNetModel(
        image_size=image_size,
        in_channels=image_channels,
        model_channels=num_channels,
        out_channels=image_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=None if not class_cond else 1000,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_gaussian_diffusion(
    *,
    steps: int = 4000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing="",
) -> SpacedDiffusion:
    """Build the (possibly respaced) diffusion process."""
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL if rescale_learned_sigmas else gd.LossType.KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


# Help of every model/diffusion setting, shared by the scripts' --help.
SETTING_HELP = {
    "image_size": "training crop width in frames; also picks the default channel_mult (spec §2)",
    "image_channels": "spectrogram channels (real, imaginary)",
    "num_channels": "base channel count of the UNet",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads",
    "num_heads_upsample": "attention heads in the decoder (-1: num_heads)",
    "num_head_channels": "channels per attention head, overrides num_heads (-1: unset)",
    "attention_resolutions": "comma list: attention at the levels where an image_size-wide input is this wide "
                             "(downsample rate image_size // value)",
    "channel_mult": "channel multiplier per level, comma list (empty: the default for image_size)",
    "dropout": "dropout rate in the residual blocks",
    "class_cond": "class-conditional model (guided-diffusion option, unused by Diffiner)",
    "use_checkpoint": "recompute activations in the backward pass to save memory",
    "use_scale_shift_norm": "FiLM-style timestep conditioning in the residual blocks",
    "resblock_updown": "resample with residual blocks instead of plain (de)convolutions",
    "use_new_attention_order": "split QKV before the heads (the published model uses the legacy order)",
    "learn_sigma": "also learn the reverse-process variance",
    "diffusion_steps": "number of diffusion steps T",
    "noise_schedule": "beta schedule: linear or cosine",
    "timestep_respacing": "respacing of the T steps, e.g. ddim200 or 250 (empty: all steps)",
    "use_kl": "train on the variational bound instead of the epsilon MSE",
    "predict_xstart": "predict x0 instead of the noise",
    "rescale_timesteps": "feed timesteps scaled to [0, 1000) to the network",
    "rescale_learned_sigmas": "with learn_sigma: scale the variational term as in Improved DDPM",
}


def str2bool(value) -> bool:
    """Parse a command-line boolean ("true"/"false", "1"/"0", "yes"/"no")."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def flag_spellings(name: str) -> Sequence[str]:
    """Option strings for a setting: --name_with_underscores and --name-with-dashes."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    return spellings


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Dict[str, Any],
                          help_texts: Optional[Dict[str, str]] = None) -> None:
    """Add one option per key, typed after its default, spelled with underscores and dashes.

    Booleans work bare (--use_fp16) and, as in guided-diffusion, with a value (--use_fp16 True).
    Help comes from `help_texts`, else SETTING_HELP.
    """
    help_texts = dict(SETTING_HELP, **(help_texts or {}))
    for key, value in default_dict.items():
        kwargs = dict(dest=key, default=value, help=help_texts.get(key, key.replace("_", " ")))
        if isinstance(value, bool):
            kwargs.update(type=str2bool, nargs="?", const=True)
        else:
            kwargs["type"] = str if value is None else type(value)
        parser.add_argument(*flag_spellings(key), **kwargs)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> Dict[str, Any]:
    """The values of `keys` from parsed arguments."""
    return {k: getattr(args, k) for k in keys}
