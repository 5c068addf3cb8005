"""Command-line flags, declared once per setting.

A `Flag` carries everything about one setting: its name, default, type, help and extra spellings.
Every command builds its parser from such declarations, so a setting taken by several commands
(the model settings, the precision switches) is declared in one place and reads the same
everywhere. Each flag is accepted with underscores and with dashes (`--root_noisy` and
`--root-noisy`), because the original code's documentation used both.
"""

import argparse
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import __version__


def str2bool(value: Any) -> bool:
    """Parse a command-line boolean ("true"/"false", "1"/"0", "yes"/"no")."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def flag_spellings(name: str) -> List[str]:
    """Option strings for a setting: --name_with_underscores and --name-with-dashes."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    return spellings


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line setting.

    :param name: the destination, with underscores; also the first spelling.
    :param default: the value when the flag is absent; a bool default makes a switch that also
        takes an explicit value (`--use_fp16` or `--use_fp16 true`, as guided-diffusion's flags).
    :param type: parses the text (each item with nargs); default: the default's type (str for None
        or a list).
    :param aliases: further names (underscores), each also spelled with dashes.
    """

    name: str
    default: Any = None
    help: str = ""
    type: Optional[Callable[[str], Any]] = None
    required: bool = False
    choices: Optional[Sequence[Any]] = None
    metavar: Optional[str] = None
    nargs: Any = None
    action: Optional[str] = None  # e.g. "append" for a flag given several times
    aliases: Tuple[str, ...] = ()

    def with_default(self, default: Any) -> "Flag":
        """The same flag with another default (e.g. a command's own respacing)."""
        return dataclasses.replace(self, default=default)

    def with_help(self, help: str) -> "Flag":
        """The same flag explained for one command."""
        return dataclasses.replace(self, help=help)

    def unset(self, help: str) -> "Flag":
        """The same flag with no default (None when absent), so that a command can tell a value
        given on the command line from one taken elsewhere; parsed as the default's type."""
        parse = self.type or (str2bool if isinstance(self.default, bool) else
                              str if self.default is None or isinstance(self.default, (list, tuple))
                              else type(self.default))
        return dataclasses.replace(self, default=None, type=parse, help=help)

    @property
    def is_switch(self) -> bool:
        """A boolean flag: given bare, or with an explicit value."""
        return isinstance(self.default, bool) or self.type is str2bool

    def add_to(self, parser) -> None:
        """Add this flag to an argparse parser or argument group."""
        spellings = flag_spellings(self.name) + [s for alias in self.aliases for s in flag_spellings(alias)]
        kwargs: Dict[str, Any] = dict(dest=self.name, help=self.help)
        if self.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = self.default
        if self.is_switch:
            kwargs.update(type=str2bool, nargs="?", const=True)
        else:
            if self.action is not None:
                kwargs["action"] = self.action
            plain = self.default is None or isinstance(self.default, (list, tuple))
            kwargs["type"] = self.type or (str if plain else type(self.default))
            if self.metavar is None and self.choices is None and kwargs["type"] in (int, float):
                kwargs["metavar"] = "N" if kwargs["type"] is int else "X"
            for key in ("choices", "metavar", "nargs"):
                if getattr(self, key) is not None:
                    kwargs[key] = getattr(self, key)
        parser.add_argument(*spellings, **kwargs)


# ----- settings dataclasses as the one declaration of a setting -----
def setting(default: Any, help: str, *, affects_output: bool = True, **flag: Any) -> Any:
    """A field of a settings dataclass that is also a command-line flag.

    The field is the one declaration of the setting: its name and default are the flag's, and
    `help` and the other `Flag` options (choices, metavar, type, aliases) ride in the field's
    metadata. `affects_output=False` marks how a run executes (batch sizes, memory format): such
    settings change results by float rounding at most, so runs that differ in them may fill one
    output folder.
    """
    return dataclasses.field(default=default, metadata={"help": help, "affects_output": affects_output,
                                                        "flag": flag})


def flags_of(settings_type: type, *, only: Optional[Sequence[str]] = None, **replacements: Flag) -> Tuple[Flag, ...]:
    """The flags of a settings dataclass: one per field declared with `setting` (or named in
    `only`), in field order; `replacements[name]` stands instead of the derived flag where a
    command takes the setting in its own form (e.g. "auto" for a number)."""
    flags = []
    for field in dataclasses.fields(settings_type):
        if only is not None and field.name not in only:
            continue
        if field.name in replacements:
            flags.append(replacements[field.name])
        elif "flag" in field.metadata:
            flags.append(Flag(field.name, field.default, field.metadata["help"], **field.metadata["flag"]))
    return tuple(flags)


def settings_of(settings_type: type, values: Any) -> Any:
    """An instance of a settings dataclass from the same-named attributes of `values` (parsed
    flags); fields it lacks keep their defaults."""
    return settings_type(**{f.name: getattr(values, f.name) for f in dataclasses.fields(settings_type)
                            if hasattr(values, f.name)})


def affects_output(settings_type: type, name: str) -> bool:
    """Whether the setting `name` of a settings dataclass changes what a run writes."""
    field = {f.name: f for f in dataclasses.fields(settings_type)}[name]
    return field.metadata.get("affects_output", True)


def add_flags(parser, flags: Iterable[Flag]) -> None:
    """Add every flag to `parser` (an ArgumentParser or an argument group)."""
    for flag in flags:
        flag.add_to(parser)


def flag_defaults(flags: Iterable[Flag]) -> Dict[str, Any]:
    """{name: default} of the flags."""
    return {flag.name: flag.default for flag in flags}


def values_of(args: argparse.Namespace, flags: Iterable[Flag]) -> Dict[str, Any]:
    """{name: parsed value} of the flags."""
    return {flag.name: getattr(args, flag.name) for flag in flags}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, made for reading.

    - Each flag is shown once, in its dashed spelling; switches without a value placeholder.
    - "(default: X)" is added where a default means something: never on required flags, switches
      that are off, or flags without a default.
    - The usage line lists what must be given, then "[options]".
    """

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        longs = [s for s in action.option_strings if s.startswith("--")]
        shorts = [s for s in action.option_strings if not s.startswith("--")]
        shown = ", ".join(shorts + [next((s for s in longs if "_" not in s), longs[0])] if longs else shorts)
        if action.nargs == 0 or (action.nargs == "?" and action.const is True):
            return shown
        return f"{shown} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.required or default is None or default is False or default is argparse.SUPPRESS
                or "%(default)" in text or not action.option_strings):
            return text
        if default == "":
            return text + " (default: empty)"
        return text + " (default: %(default)s)"

    def add_usage(self, usage, actions, groups, prefix=None):
        if usage is None:
            required = [self._format_action_invocation(a) for a in actions if a.option_strings and a.required]
            positional = [self._format_args(a, a.dest) for a in actions if not a.option_strings]
            usage = " ".join(["%(prog)s", *required, "[options]", *positional])
        super().add_usage(usage, actions, groups, prefix)


# Every command takes it: errors then show their traceback instead of one line.
DEBUG_FLAG = Flag("debug", False, "on an error, show the full traceback instead of one line")


def command_parser(description: str, groups: Dict[str, Iterable[Flag]], prog: Optional[str] = None
                   ) -> argparse.ArgumentParser:
    """An ArgumentParser with the project's help formatter and one argument group per entry of
    `groups` (title: flags), in the order given: the settings a user changes first, the model
    settings last."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter,
        epilog="Multi-word flags may be written with dashes or underscores (--batch-size = --batch_size).",
    )
    for title, flags in groups.items():
        add_flags(parser.add_argument_group(title), flags)
    DEBUG_FLAG.add_to(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s (diffiner) {__version__}",
                        help="print the version and exit")
    return parser


MODEL_GROUP = "model and diffusion (must match the checkpoint; default: the published model)"


# ----- settings shared by several commands -----

# The writers of a folder of outputs (refine, enhance, resample) skip outputs that exist unless told.
OVERWRITE_FLAG = Flag("overwrite", False, "redo every output, also those already done; into a folder written with "
                                          "other settings: delete the files its record lists first")
# What a command shows while it runs; every command but diffiner-train takes both as CONSOLE_FLAGS.
NO_PROGRESS_FLAG = Flag("no_progress", False, "no progress bar")
QUIET_FLAG = Flag("quiet", False, "print only warnings, errors and the closing one-line summary (no progress bar, "
                                  "no notes)")
CONSOLE_FLAGS = (NO_PROGRESS_FLAG, QUIET_FLAG)
# The commands that run the network on a device (refine, sample).
DEVICE_FLAG = Flag("device", None, "torch device, e.g. cuda:1 (default: cuda if available, else cpu)",
                   metavar="DEVICE")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_FLAGS = (
    Flag("precision", None, "the network's precision: fp32, or bf16 / fp16 autocast (training adds dynamic loss "
                            "scaling to fp16); auto: bf16 with channels-last on a CPU with native bf16 (AVX512-BF16 "
                            "or AMX), else fp32 (default: auto for refining and sampling, fp32 for training)",
         choices=PRECISIONS),
    Flag("use_fp16", False, "the same as --precision fp16 (the original's switch)"),
    Flag("bf16", False, "the same as --precision bf16"),
)


def precision_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, default: str = "auto") -> str:
    """The precision asked for by --precision and its aliases --use_fp16 and --bf16 (`default`
    when none is given: "auto" for the commands that run a trained network, "fp32" for
    training); two that disagree are a usage error."""
    asked = {args.precision} - {None}
    asked |= {name for name, on in (("fp16", args.use_fp16), ("bf16", args.bf16)) if on}
    if len(asked) > 1:
        parser.error(f"the precision flags disagree: {' and '.join(sorted(asked))}; give one --precision")
    return asked.pop() if asked else default
