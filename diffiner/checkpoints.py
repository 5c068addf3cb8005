"""Checkpoint files: the one place where refining, training and sampling read weights, and where
training writes the files of a step as one set.

A checkpoint is a plain state dict of the UNet, as published (`pretrained_diffiner_onVB.pt`) or as
written by training (`modelNNNNNN.pt`, `ema_<rate>_NNNNNN.pt`). The network is built from its
settings first, then the weights are loaded strictly, so settings that do not match the file are
reported instead of silently ignored. A file that cannot be read at all (empty, not a checkpoint,
truncated, corrupt) is reported as such, naming it: `load_state_dict` diagnoses every file read.
Only regular files are read (`open_regular`): a FIFO named like a checkpoint would block the
open for ever.

Training writes, for step NNNNNN (the number of steps done), a *checkpoint set*:
`modelNNNNNN.pt`, one `ema_<rate>_NNNNNN.pt` per EMA rate and `optNNNNNN.pt`. The files of a
set become visible together: all are written under temporary names first, then renamed, the
model file last (`save_checkpoint_set`). Hence the rule that holds at every instant, whatever
kills the process: **a model file present implies that its whole set, from the same save, is
present**. A kill leaves at most temporary files (removed by `remove_interrupted_saves`) and
optimizer or EMA files of a step without its model file (ignored, and replaced when that step is
saved again). A write that fails (a full disk) raises OutputError naming the file and the space
left, and leaves the earlier sets as they were. `prune_checkpoint_sets` (--keep_last) removes
older sets under the same rule: model file first.
"""

import contextlib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml

from .audio.io import (TEMPORARY_PREFIX, OutputError, atomic_output, free_space_hint, open_regular, read_yaml_record,
                       write_text_atomic)
from .errors import error_text
from .respace import SpacedDiffusion
from .script_util import ARCHITECTURE_KEYS, create_model_and_diffusion, model_and_diffusion_defaults
from .unet import UNetModel

logger = logging.getLogger(__name__)

DDP_PREFIX = "module."  # what DistributedDataParallel prepends to every key

# How torch.save's files begin: its zip archive (torch >= 1.6), or the legacy format's pickle
# protocol marker.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MARKER = b"\x80"
# The zip "end of central directory" record: the last thing written, so a truncated archive lacks it.
ZIP_END_MAGIC = b"PK\x05\x06"
ZIP_END_SEARCH = 65536 + 22  # the record, plus the longest comment a zip may have

# Only tensors and plain values are unpickled where torch can tell (>= 1.13).
SAFE_LOAD = {"weights_only": True} if "weights_only" in inspect.signature(torch.load).parameters else {}

MODEL_FILE = re.compile(r"model(\d+)\.pt")
SET_FILE = re.compile(r"(?:model|opt)(\d+)\.pt|ema_[^_]+_(\d+)\.pt")
# audio.io.atomic_output's temporary names ("<TEMPORARY_PREFIX><id>-<final name>") of checkpoint files.
INTERRUPTED_SAVE = re.compile(re.escape(TEMPORARY_PREFIX) + r"[0-9a-f]+-(?:(?:model|opt)\d+|ema_[^_]+_\d+)\.pt")


# ----- reading -----
def load_state_dict(path: str) -> Dict[str, Any]:
    """A dict saved with torch.save, read onto the CPU; DDP's "module." prefix is removed.

    Raises FileNotFoundError when `path` does not exist, and ValueError naming the file and the
    problem when it is not a readable checkpoint (empty, a folder, not written by torch.save,
    truncated, corrupt) or does not hold a dict.
    """
    state = _load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in state.items()}


def _load(path: str) -> Any:
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a checkpoint file")
    # Everything below reads the one file opened here: a name swapped for a FIFO after the
    # check cannot block a later open.
    with open_regular(path) as f:  # FileNotFoundError names the file
        head = f.read(len(ZIP_MAGIC))
        if not head:
            raise ValueError(f"{path}: the file is empty (0 bytes), not a checkpoint (an interrupted copy or save?)")
        if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MARKER)):
            raise ValueError(f"{path}: not a PyTorch checkpoint ({_describe_content(f)})")
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", **SAFE_LOAD)
        except Exception as exc:  # torch raises many types (RuntimeError, EOFError, UnpicklingError, ...)
            raise ValueError(f"{path}: {_diagnose(f, head, exc)}") from exc


def _describe_content(f: IO[bytes]) -> str:
    f.seek(0)
    start = f.read(512)
    try:
        start.decode("utf-8")
    except UnicodeDecodeError:
        return "it was not written by torch.save"
    return "it holds text"


def _diagnose(f: IO[bytes], head: bytes, exc: Exception) -> str:
    """Why torch could not read a file (open as `f`) that begins like a checkpoint, in a few words."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    size = os.fstat(f.fileno()).st_size
    if "weights only load failed" in reason.lower():
        return f"holds Python objects besides tensors and plain values, which are not loaded for safety ({reason})"
    if head.startswith(ZIP_MAGIC):
        f.seek(max(0, size - ZIP_END_SEARCH))
        complete = ZIP_END_MAGIC in f.read()
        if not complete:
            return f"the checkpoint is truncated ({size} bytes, its end is missing: an interrupted save or copy?)"
    elif isinstance(exc, EOFError):
        return f"the checkpoint is truncated ({size} bytes: an interrupted save or copy?)"
    return f"the checkpoint is corrupt ({size} bytes; torch: {reason})"


# ----- the settings a checkpoint carries -----
# Beside the weights, one per folder (as diffusers' config.json): every model and diffusion
# setting of the checkpoints in that folder, written by training. The weight files stay plain
# state dicts, as the authors' code reads them.
MODEL_CONFIG = "model_config.yml"
MODEL_CONFIG_MAX_BYTES = 64 * 1024  # a few dozen settings; more is not a model config
PUBLISHED = "the published defaults"


@dataclass(frozen=True)
class ModelSettings:
    """Every model and diffusion setting of a checkpoint, and where they came from."""

    values: Dict[str, Any]
    source: str  # the model_config.yml read, or PUBLISHED
    carried: Dict[str, Any]  # what the model_config.yml holds ({} without one)


def model_config_path(model_path: str) -> str:
    """Where the settings of the checkpoint at `model_path` are: its folder's model_config.yml."""
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), MODEL_CONFIG)


def read_model_config(model_path: str) -> Dict[str, Any]:
    """The settings carried beside the checkpoint at `model_path` ({} when there are none).

    ValueError naming the file when it is not a mapping of known settings, each of the type of
    its published default.
    """
    path = model_config_path(model_path)
    if not os.path.exists(path):
        return {}
    config = read_yaml_record(path, MODEL_CONFIG_MAX_BYTES)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of model settings, got {type(config).__name__}")
    known = model_and_diffusion_defaults()
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown model settings {', '.join(unknown)}")
    return {key: _carried_value(path, key, value, known[key]) for key, value in config.items()}


def _carried_value(path: str, key: str, value: Any, default: Any) -> Any:
    """`value` as a setting of `default`'s type; ValueError naming the file and the setting.

    A text setting (attention_resolutions "16,8", channel_mult) may have been read by YAML as a
    number ("8"), and a float one as an integer; nothing else is converted."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise ValueError(f"{path}: {key} must be {type(default).__name__}, got {value!r}")
    return value


def resolve_model_settings(model_path: str, given: Optional[Dict[str, Any]] = None, *,
                           refuse: Sequence[str] = ARCHITECTURE_KEYS) -> ModelSettings:
    """The settings to build the checkpoint's network with: each one given (not None), else the
    carried one, else the published default.

    ValueError naming the setting and both values when a given setting in `refuse` contradicts
    the carried one (the weights cannot fit it). A given diffusion setting that differs from the
    carried one wins, with a warning: the network still fits, the process is the user's choice.
    """
    carried = read_model_config(model_path)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    for key, value in given.items():
        if key in carried and not _same_setting(carried[key], value):
            if key in refuse:
                raise ValueError(f"--{key.replace('_', '-')} {value} contradicts {key}: {carried[key]} carried by "
                                 f"{model_config_path(model_path)}; leave the flag out")
            logger.warning("%s %s replaces %s carried by %s", key, value, carried[key], model_config_path(model_path))
    values = {**model_and_diffusion_defaults(), **carried, **given}
    return ModelSettings(values, model_config_path(model_path) if carried else PUBLISHED, carried)


def _same_setting(carried: Any, given: Any) -> bool:
    """Equal as settings: "16,8" from the command line equals 16,8 parsed by YAML as a string."""
    return carried == given or str(carried).replace(" ", "") == str(given).replace(" ", "")


def write_model_config(folder: str, values: Dict[str, Any]) -> None:
    """Write `folder`/model_config.yml: the settings of the checkpoints written there."""
    write_text_atomic(os.path.join(folder, MODEL_CONFIG), yaml.safe_dump(dict(values), sort_keys=False))


def load_weights(model: torch.nn.Module, path: str, source: str = PUBLISHED) -> None:
    """Load the state dict at `path` into `model` strictly.

    Raises ValueError naming the file when it cannot be read (see `load_state_dict`), or, in one
    short line, when its weights do not fit the model built from the settings of `source`.
    """
    state = load_state_dict(path)
    difference = first_difference(model.state_dict(), state)
    if difference is not None:
        raise ValueError(f"{path}: the weights do not fit the model settings from {source}: {difference}")
    model.load_state_dict(state, strict=True)


def first_difference(expected: Dict[str, torch.Tensor], state: Dict[str, Any]) -> Optional[str]:
    """The first tensor (in the model's order) in which a state dict does not fit a model's,
    and how many others differ; None when it fits."""
    problems = []
    for key, tensor in expected.items():
        if key not in state:
            problems.append(f"{key} is missing from the file")
        elif not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape:
            shape = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            problems.append(f"{key} is {shape} in the file, {tuple(tensor.shape)} in the model")
    problems += [f"{key} in the file is not in the model" for key in state if key not in expected]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else "")


def load_model(model_path: str, model_settings: Union[None, Dict[str, Any], ModelSettings] = None, *,
               timestep_respacing: str = "") -> Tuple[UNetModel, SpacedDiffusion]:
    """(model, diffusion) for the checkpoint at `model_path`, on the CPU: built from the
    settings it carries, each overridden by `model_settings` (see `resolve_model_settings`; or
    settings it already resolved), the diffusion respaced by `timestep_respacing`."""
    settings = model_settings if isinstance(model_settings, ModelSettings) else \
        resolve_model_settings(model_path, model_settings)
    model, diffusion = create_model_and_diffusion(timestep_respacing=timestep_respacing, **settings.values)
    load_weights(model, model_path, settings.source)
    return model, diffusion


# ----- training's checkpoint sets -----
def model_filename(step: int) -> str:
    return f"model{step:06d}.pt"


def opt_filename(step: int) -> str:
    return f"opt{step:06d}.pt"


def ema_filename(rate: float, step: int) -> str:
    return f"ema_{rate}_{step:06d}.pt"


def checkpoint_step(path: str) -> int:
    """NNNNNN of a `modelNNNNNN.pt` path; ValueError for any other name."""
    match = MODEL_FILE.fullmatch(os.path.basename(path))
    if not match:
        raise ValueError(f"{path}: not a modelNNNNNN.pt file written by training")
    return int(match.group(1))


def missing_set_files(folder: str, step: int, rates: Optional[List[float]] = None) -> List[str]:
    """The files of the set of `step` (optimizer state, and the EMAs of `rates`) absent from `folder`."""
    names = [opt_filename(step)] + [ema_filename(rate, step) for rate in rates or []]
    return [name for name in names if not os.path.exists(os.path.join(folder, name))]


def saved_steps(folder: str) -> List[int]:
    """The steps that have a model file in `folder`, in increasing order."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for m in map(MODEL_FILE.fullmatch, os.listdir(folder)) if m)


def newest_complete_step(folder: str, rates: Optional[List[float]] = None) -> Optional[int]:
    """The newest step of `folder` whose set is complete (model, optimizer and the EMA files of
    `rates`), or None.

    Sets written by `save_checkpoint_set` are always complete; an incomplete one was written by
    an older version of this code or had files removed, and is skipped with a warning.
    """
    steps = saved_steps(folder)
    for step in reversed(steps):
        missing = missing_set_files(folder, step, rates)
        if not missing:
            return step
        logger.warning("%s: %s has no %s beside it: not resumable, skipped", folder, model_filename(step),
                       " or ".join(missing))
    return None


def save_checkpoint_set(folder: str, step: int, model_state: Dict[str, torch.Tensor],
                        ema_states: Dict[float, Dict[str, torch.Tensor]], training_state: Dict[str, Any]) -> str:
    """Write the checkpoint set of `step` into `folder` so that its files become visible together;
    returns the model file's path.

    Every file is written and flushed to disk under a temporary name first. Then the files of any
    earlier save of the same step are removed, the model file first, so that no model file ever
    sits beside the files of another save; then the temporary files are renamed, the model file
    last, with the folder synced to disk between the steps. An error leaves no temporary file; a
    kill leaves temporary files (see `remove_interrupted_saves`) and perhaps set files without
    their model file, never a model file without its set.
    """
    files = [(model_filename(step), model_state)]
    files += [(ema_filename(rate, step), state) for rate, state in ema_states.items()]
    files.append((opt_filename(step), training_state))
    with contextlib.ExitStack() as renames:
        # atomic_output renames its temporary file when its context exits, and ExitStack exits
        # in reverse order: the optimizer file, the EMA files, the folder synced (so that after
        # a power cut too, the model file is never on disk without them), the model file. An
        # exception exits them all without renaming and removes the temporary files.
        for index, (name, state) in enumerate(files):
            tmp = renames.enter_context(atomic_output(os.path.join(folder, name)))
            if index == 0:
                renames.callback(_fsync_folder, folder)
            _write_state(tmp, os.path.join(folder, name), state)
        earlier = _set_files_of_step(folder, step)
        for name in earlier:
            os.remove(os.path.join(folder, name))
        if earlier:
            _fsync_folder(folder)  # gone for good before any new file of the step appears
    _fsync_folder(folder)
    return os.path.join(folder, model_filename(step))


def prune_checkpoint_sets(folder: str, keep: int, step: int, rates: Optional[List[float]] = None) -> List[int]:
    """Keep the newest `keep` (>= 1) complete sets of the steps up to `step` (the run's current
    one, just saved) and remove the older ones; returns the steps removed.

    A set is removed model file first, the folder synced before its other files go, so that the
    rule of `save_checkpoint_set` holds at every instant: a kill leaves that set's other files
    without their model file (ignored, and removed by the next pruning), never a model file
    without its set. The newest complete set, which a resume takes, is always kept. Sets of later
    steps are left alone: they belong to the run this one was resumed from, at an older set, and
    are replaced as training reaches their steps. Incomplete sets (written by older versions of
    this code) are not counted and not removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    complete = [s for s in saved_steps(folder) if s <= step and not missing_set_files(folder, s, rates)]
    removed = complete[:-keep]
    for old in removed:
        names = _set_files_of_step(folder, old)
        os.remove(os.path.join(folder, names[0]))  # the model file: the set is no longer resumable
        _fsync_folder(folder)
        for name in names[1:]:
            os.remove(os.path.join(folder, name))
    models = set(saved_steps(folder))
    leftovers = [name for name in os.listdir(folder) if SET_FILE.fullmatch(name) and not name.startswith("model")
                 and _set_step(name) <= step and _set_step(name) not in models]
    for name in leftovers:  # of a pruning or a save killed earlier
        os.remove(os.path.join(folder, name))
    if removed or leftovers:
        _fsync_folder(folder)
    return removed


def _write_state(tmp: str, path: str, state: Dict[str, Any]) -> None:
    """torch.save `state` into `tmp`, flushed to disk; OutputError naming `path` (the file it
    becomes) and the free space when that fails."""
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:
        # torch reports a full disk as a RuntimeError of its zip writer ("enforce fail at
        # inline_container.cc ... unexpected pos"), which names neither the file nor the cause.
        raise OutputError(f"{path}: cannot write the checkpoint ({error_text(exc)[:200]}"
                          f"{free_space_hint(os.path.dirname(os.path.abspath(path)))})") from exc


def _set_step(name: str) -> int:
    """The step of a checkpoint-set file name (one that SET_FILE matches)."""
    match = SET_FILE.fullmatch(name)
    return int(match.group(1) or match.group(2))


def _set_files_of_step(folder: str, step: int) -> List[str]:
    """The files of `step`'s set in `folder`, the model file first."""
    names = [name for name in os.listdir(folder) if SET_FILE.fullmatch(name) and _set_step(name) == step]
    return sorted(names, key=lambda name: not name.startswith("model"))


def _fsync_folder(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a system where folders cannot be opened (Windows): renames are durable there
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def remove_interrupted_saves(folder: str) -> List[str]:
    """Remove the temporary checkpoint files that a killed save left in `folder`; returns their names.

    Call it only while no save is running in `folder` (when training starts).
    """
    if not os.path.isdir(folder):
        return []
    removed = sorted(name for name in os.listdir(folder) if INTERRUPTED_SAVE.fullmatch(name))
    for name in removed:
        os.remove(os.path.join(folder, name))
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted checkpoint save in %s", len(removed), folder)
    return removed
