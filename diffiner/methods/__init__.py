"""Reverse processes as plug-ins: Diffiner, Diffiner+ and plain DDIM, one module each.

A method is a `ReverseProcess` subclass (see `base`), registered under its name. Adding one is
one new module and one `register_method` call; packages installed beside Diffiner may also
declare theirs under the `diffiner.methods` entry-point group, which is read the first time the
registry is consulted. `diffiner-refine --method NAME` and `refine(..., method=NAME)` take any
registered name.
"""

import logging
from typing import Dict, List, Mapping, Optional, Type

from .base import Etas, ReverseProcess, Step
from .ddim import DDIM
from .diffiner import Diffiner
from .diffiner_plus import DiffinerPlus

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "diffiner.methods"
DEFAULT_METHOD = DiffinerPlus.name

_REGISTRY: Dict[str, Type[ReverseProcess]] = {}
_entry_points_loaded = False


def register_method(method: Type[ReverseProcess]) -> Type[ReverseProcess]:
    """Register a ReverseProcess subclass under its `name` (usable as a class decorator)."""
    if not getattr(method, "name", None) or not isinstance(method.name, str):
        raise ValueError(f"{method!r} has no name")
    known = _REGISTRY.get(method.name)
    if known is not None and known is not method:
        raise ValueError(f"a method named {method.name!r} is already registered ({known.__module__})")
    _REGISTRY[method.name] = method
    return method


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    try:
        from importlib.metadata import entry_points
    except ImportError:  # Python < 3.8 has no importlib.metadata
        return
    found = entry_points()
    group = found.select(group=ENTRY_POINT_GROUP) if hasattr(found, "select") else found.get(ENTRY_POINT_GROUP, ())
    for entry in group:
        try:
            register_method(entry.load())
        except Exception as exc:  # a broken plug-in must not break the built-in methods
            logger.warning("method plug-in %s could not be loaded: %s", entry.value, exc)


def method_names() -> List[str]:
    """The registered methods, built-in ones first."""
    _load_entry_points()
    return list(_REGISTRY)


def get_method(name: str) -> Type[ReverseProcess]:
    """The method registered as `name`; ValueError listing the choices for an unknown one."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_method(name: str, etas: Optional[Mapping[str, Optional[float]]] = None) -> ReverseProcess:
    """An instance of method `name` with the given etas (None or absent: its defaults)."""
    method = get_method(name)
    return method(method.resolve_etas(etas))


def resolve_etas(name: str, **given: Optional[float]) -> Dict[str, float]:
    """The etas method `name` uses: the given ones, its defaults for the rest (ValueError for
    an unknown method, a name it does not use, or a value it cannot)."""
    return get_method(name).resolve_etas(given).as_dict()


for _builtin in (DiffinerPlus, Diffiner, DDIM):
    register_method(_builtin)

__all__ = ["DEFAULT_METHOD", "DDIM", "Diffiner", "DiffinerPlus", "Etas", "ReverseProcess", "Step", "build_method",
           "get_method", "method_names", "register_method", "resolve_etas"]
