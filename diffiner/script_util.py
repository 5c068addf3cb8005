"""Model/diffusion construction from flat keyword settings, and the flags that carry them.

The keyword names are guided-diffusion's, so that command lines and configuration files
written for the original code keep working.
"""

from typing import Any, Dict, Tuple

from . import gaussian_diffusion as gd
from .flags import Flag, flag_defaults
from .respace import SpacedDiffusion, space_timesteps
from .spectrogram import PUBLISHED, WINDOWS, FrontEnd
from .unet import UNetModel

# channel_mult per image_size when the user leaves it empty (docs/method.md, "The network").
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# Every model setting, its default (the published Diffiner configuration) and its help.
MODEL_FLAGS = (
    Flag("image_size", 256, "training crop width in frames; also picks the default channel_mult"),
    Flag("image_channels", 2, "spectrogram channels (real, imaginary)"),
    Flag("num_channels", 128, "base channel count of the UNet"),
    Flag("num_res_blocks", 3, "residual blocks per resolution level"),
    Flag("num_heads", 4, "attention heads"),
    Flag("num_heads_upsample", -1, "attention heads in the decoder (-1: num_heads)"),
    Flag("num_head_channels", -1, "channels per attention head, overrides num_heads (-1: unset)"),
    Flag("attention_resolutions", "16,8", "comma list: attention at the levels where an image_size-wide input "
         "is this wide (downsample rate image_size // value)"),
    Flag("channel_mult", "", "channel multiplier per level, comma list (empty: the default for image_size)"),
    Flag("dropout", 0.0, "dropout rate in the residual blocks"),
    Flag("class_cond", False, "class-conditional model (guided-diffusion option, unused by Diffiner)"),
    Flag("use_checkpoint", False, "recompute activations in the backward pass to save memory"),
    Flag("use_scale_shift_norm", True, "FiLM-style timestep conditioning in the residual blocks"),
    Flag("resblock_updown", False, "resample with residual blocks instead of plain (de)convolutions"),
    Flag("use_new_attention_order", False, "split QKV before the heads (the published model uses the legacy order)"),
)

# Every diffusion setting (Diffiner trains with 4000 linear steps). They describe the process
# the network was trained for, so they travel with the weights like the model settings.
DIFFUSION_FLAGS = (
    Flag("learn_sigma", False, "also learn the reverse-process variance"),
    Flag("diffusion_steps", 4000, "number of diffusion steps T"),
    Flag("noise_schedule", "linear", "beta schedule: linear or cosine", aliases=("noise_scheduler",)),
    Flag("use_kl", False, "train on the variational bound instead of the epsilon MSE"),
    Flag("predict_xstart", False, "predict x0 instead of the noise"),
    Flag("rescale_timesteps", False, "feed timesteps scaled to [0, 1000) to the network"),
    Flag("rescale_learned_sigmas", False, "with learn_sigma: scale the variational term as in Improved DDPM"),
)

# The signal front-end the prior works in (spectrogram.FrontEnd). The network's frequency size
# follows from it (n_fft / 2 bins), and a prior knows only the spectra of its own front-end.
FRONT_END_FLAGS = (
    Flag("sample_rate", PUBLISHED.sample_rate, "the model's sample rate in Hz: audio is resampled to it"),
    Flag("n_fft", PUBLISHED.n_fft, "STFT size (and window length); the network sees n_fft / 2 frequency bins, "
         "which must be a multiple of its downsampling"),
    Flag("hop_length", PUBLISHED.hop_length, "STFT hop in samples"),
    Flag("window", PUBLISHED.window, "STFT window (periodic)", choices=tuple(WINDOWS)),
)

MODEL_AND_DIFFUSION_FLAGS = MODEL_FLAGS + FRONT_END_FLAGS + DIFFUSION_FLAGS

# Settings that decide the network's shape or what its input means: a checkpoint's weights fit
# only the values it was trained with (learn_sigma doubles the output channels).
ARCHITECTURE_KEYS = tuple(f.name for f in MODEL_FLAGS + FRONT_END_FLAGS) + ("learn_sigma",)

# The published sampler: DDIM over 200 of the 4000 steps (refining and sampling default to it).
# Respacing is a sampler setting (as diffusers' set_timesteps), chosen at inference: never a
# model setting.
SAMPLING_RESPACING = "ddim200"
RESPACING_FLAG = Flag("timestep_respacing", SAMPLING_RESPACING,
                      "the sampler's steps: ddimN (N evenly spaced steps, DDIM spacing) or a comma list of "
                      "step counts per section, e.g. 250 (empty: all diffusion steps)")


def diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the diffusion process."""
    return flag_defaults(DIFFUSION_FLAGS)


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of every model and diffusion setting: the published Diffiner configuration."""
    return flag_defaults(MODEL_AND_DIFFUSION_FLAGS)


def carried_setting_flags() -> Tuple[Flag, ...]:
    """The model and diffusion flags for commands that load a checkpoint: absent means "what
    the checkpoint carries, else the published value", so each defaults to None and its help
    names the published value."""
    return tuple(flag.unset(f"{flag.help} (published: {flag.default if flag.default != '' else 'empty'})")
                 for flag in MODEL_AND_DIFFUSION_FLAGS)


def create_model_and_diffusion(timestep_respacing="", **kwargs) -> Tuple[UNetModel, SpacedDiffusion]:
    """Build (model, diffusion) from the settings of `model_and_diffusion_defaults()`, the
    diffusion respaced by `timestep_respacing` (guided-diffusion's signature). The model's
    `front_end` is the spectrogram.FrontEnd of the settings.

    Unknown keywords raise TypeError; missing ones take the defaults. ValueError when the
    front-end's bins are no multiple of the network's downsampling.
    """
    settings = model_and_diffusion_defaults()
    unknown = set(kwargs) - set(settings)
    if unknown:
        raise TypeError(f"unknown model/diffusion settings: {sorted(unknown)}")
    settings.update(kwargs)
    other_keys = set(diffusion_defaults()) | {f.name for f in FRONT_END_FLAGS}
    model = create_model(**{k: v for k, v in settings.items() if k not in other_keys or k == "learn_sigma"})
    model.front_end = FrontEnd.from_settings(settings)
    if model.front_end.num_bins % model.downsample_factor:
        raise ValueError(f"n_fft {model.front_end.n_fft} gives {model.front_end.num_bins} frequency bins, not a "
                         f"multiple of {model.downsample_factor}, the downsampling of {len(model.channel_mult)} "
                         "resolution levels")
    diffusion = create_gaussian_diffusion(
        steps=settings["diffusion_steps"],
        learn_sigma=settings["learn_sigma"],
        noise_schedule=settings["noise_schedule"],
        use_kl=settings["use_kl"],
        predict_xstart=settings["predict_xstart"],
        rescale_timesteps=settings["rescale_timesteps"],
        rescale_learned_sigmas=settings["rescale_learned_sigmas"],
        timestep_respacing=timestep_respacing,
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
