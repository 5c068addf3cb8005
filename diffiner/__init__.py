"""Diffiner: diffusion-based refinement of enhanced speech (Sawata et al., INTERSPEECH 2023).

The public API, importable from the package itself::

    from diffiner import Refiner
    refiner = Refiner.from_pretrained("published")  # downloaded once into ~/.cache/diffiner
    refiner = Refiner.from_checkpoint("ema_0.9999_100000.pt")  # a checkpoint file

`Refiner`, `RefinerSettings` and its groups (`MethodSettings`, `SegmentSettings`,
`BatchSettings`, `ExecutionSettings`), `ArrayError` (an array the API cannot take as audio),
`refine` (the reverse-process loop on spectrogram batches) and the registry of reverse processes
(`register_method`, `get_method`, `method_names`, `resolve_etas`, `ReverseProcess`,
`DEFAULT_METHOD`).
"""

import importlib
from typing import Any, List

__version__ = "0.1.0"

# Name -> the module that defines it. Loaded on first use (PEP 562): these modules import torch,
# which takes seconds, and every command imports this package, the folder commands
# (diffiner-resample, diffiner-enhance, make_noisy_set, evaluate) included, which need no torch.
_EXPORTS = {
    **dict.fromkeys(("Refiner", "RefinerSettings", "MethodSettings", "SegmentSettings", "BatchSettings",
                     "ArrayError"), "diffiner.pipeline"),
    "ExecutionSettings": "diffiner.acceleration",
    "refine": "diffiner.refiner",
    **dict.fromkeys(("register_method", "get_method", "method_names", "resolve_etas", "ReverseProcess",
                     "DEFAULT_METHOD"), "diffiner.methods"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        # AttributeError, so that `from diffiner import <submodule>` goes on to import it.
        raise AttributeError(f"module 'diffiner' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
