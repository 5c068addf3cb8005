"""What a reverse process is, as `refine` sees it: a per-step update plus its own etas.

`diffiner.refiner.refine` owns the loop: the timesteps, the network call and the fresh noise z
of every step (so that every method draws the same noise from the same per-segment generators).
A method only says how x_{i-1} follows from them, like a diffusers scheduler's `step` under a
pipeline's loop. Its etas are a frozen dataclass whose fields, in order, are what `--etas` sets,
with the paper's defaults; `validate` refuses values the update cannot use.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Type

import torch


@dataclass(frozen=True)
class Etas:
    """Base of a method's etas: every field is a float in [0, 1]."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{field.name} must lie in [0, 1], got {value}")
            object.__setattr__(self, field.name, float(value))

    def as_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class Step:
    """What one reverse step i -> i-1 knows.

    `x0` and `eps` are the network's predictions for the current x_i; `y` is the observation
    (the noisy spectrogram) and `sigma_y` its per-bin noise level; `a` and `s` are
    sqrt(alpha_bar_{i-1}) and sqrt(1 - alpha_bar_{i-1}), `alpha_bar` is alpha_bar_i; `z` the
    fresh standard normal noise (zeros at the last step, where s = 0).
    """

    x0: torch.Tensor
    eps: torch.Tensor
    y: torch.Tensor
    sigma_y: torch.Tensor
    a: float
    s: float
    alpha_bar: float
    z: torch.Tensor
    inpaint_mask: Optional[torch.Tensor] = None


class ReverseProcess:
    """One reverse process. Subclasses set `name`, `etas_type` and `folder_tag`, and implement
    `step`; `finish` may report what the run did (it may read device tensors: it runs once).

    An instance lives for one call of `refine`, so it may keep state across steps.
    """

    name: ClassVar[str]
    etas_type: ClassVar[Type[Etas]]
    description: ClassVar[str] = ""
    supports_inpainting: ClassVar[bool] = False

    def __init__(self, etas: Etas):
        self.etas = etas

    @classmethod
    def resolve_etas(cls, given: Optional[Mapping[str, Optional[float]]] = None) -> Etas:
        """The method's etas from the given ones (None: the default), ValueError for a name the
        method does not use or a value it cannot."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        names = [f.name for f in dataclasses.fields(cls.etas_type)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not used by {cls.name}; "
                             f"only {names} are")
        return cls.etas_type(**given)

    @classmethod
    def eta_names(cls):
        return [f.name for f in dataclasses.fields(cls.etas_type)]

    @classmethod
    def folder_name(cls, etas: Etas) -> str:
        """The default output folder of a run: the method's name and its etas, e.g.
        `diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6` (the original's naming)."""
        parts = [f"eta{name[len('eta_'):].upper()}={value}" if name.startswith("eta_") else f"{name}={value}"
                 for name, value in etas.as_dict().items()]
        return "_".join([cls.name] + parts)

    def step(self, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, steps: int) -> None:
        """Called once after the last step of a `refine` call."""

    def describe(self) -> Dict[str, Any]:
        """The method and its etas, as config.yml records them."""
        return {"method": self.name, **self.etas.as_dict()}
