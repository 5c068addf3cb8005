"""Arguments.md lists every flag of every command, with its default: the parsers are built from
the settings' declarations, and this test holds the page to them."""

import argparse
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_SECTION = "### Model and diffusion flags"
# Defaults the parser computes on the machine it runs on: the page says how.
COMPUTED_DEFAULTS = {("diffiner.commands.evaluate", "--workers"): "number of CPUs"}
# module, its parser factory, and the Arguments.md sections that document its flags
COMMANDS = [
    ("diffiner.commands.refine", "build_parser", ["## `scripts/run_refiner.py`", MODEL_SECTION]),
    ("diffiner.commands.evaluate", "build_parser", ["## `scripts/evaluate.py`"]),
    ("diffiner.commands.train", "create_argparser", ["## `scripts/train.py`", MODEL_SECTION]),
    ("diffiner.commands.sample_prior", "create_argparser", ["## `scripts/sample.py`", MODEL_SECTION]),
    ("diffiner.commands.enhance", "build_parser", ["## Helper commands"]),
    ("diffiner.commands.resample_audio", "build_parser", ["## Helper commands"]),
    ("diffiner.commands.make_noisy_set", "build_parser", ["## Helper commands"]),
    ("diffiner.commands.pretrained", "build_parser", ["## Helper commands"]),
]


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    start = text.index(heading)
    level = heading.split(" ")[0]
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.MULTILINE)
    return text[start:start + len(heading) + (following.start() if following else len(text))]


def default_texts(default):
    """How a default may be written on the page."""
    if isinstance(default, (list, tuple)):
        return {" ".join(str(v) for v in default), " ".join(format(v, "g") if isinstance(v, float) else str(v)
                                                             for v in default)}
    texts = {str(default)}
    if isinstance(default, float):
        texts.add(format(default, "g"))
        texts.add(re.sub(r"e([-+])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2),
                         format(default, ".0e")))  # 1e-4, as people write it
        if default.is_integer():
            texts.add(str(int(default)))
    return texts


@pytest.mark.parametrize("module, factory, headings", COMMANDS, ids=[c[0].rsplit(".", 1)[1] for c in COMMANDS])
def test_every_flag_is_documented_with_its_default(module, factory, headings):
    page = open(os.path.join(ROOT, "Arguments.md")).read()
    sections = [section(page, heading) for heading in headings]
    parser = getattr(importlib.import_module(module), factory)()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        spellings = [s for s in action.option_strings if s.startswith("--")]
        pattern = re.compile("`(" + "|".join(re.escape(s) for s in spellings) + ")[` \\]]")
        lines = [line for text in sections for line in text.splitlines() if pattern.search(line)]
        assert lines, f"{module}: {spellings[0]} is not in Arguments.md ({', '.join(headings)})"
        default = action.default
        computed = COMPUTED_DEFAULTS.get((module, spellings[0]))
        if computed is not None:
            assert any(computed in line for line in lines), f"{module}: {spellings[0]}: '{computed}' is not on its line"
            continue
        if default in (None, False, "", argparse.SUPPRESS):
            continue
        assert any(text in line for line in lines for text in default_texts(default)), \
            f"{module}: {spellings[0]}'s default {default!r} is not on its line in Arguments.md"
