"""A property of the refiner over random folder trees: whatever the tree holds (nested folders,
links to files and folders, link loops, odd names up to the file system's 255 bytes, FIFOs,
folders that cannot be listed, empty and broken files, 0-2000 samples at 8-48 kHz, mono and
stereo) and wherever the output folder lies (inside the processed or the noisy folder, behind a
link, or in a folder holding inputs, which is refused), the run ends, changes no input byte,
refines every readable pair at its exact length, names everything else, and says by its exit
status whether anything failed.

Twenty trees from a seeded generator (each a new seed), with the tiny model and two steps. On a
few of them, two resampling runs with other rates into one folder inside the input, started at
once: each does its whole run or is refused naming the other, and they never mix their files.
"""

import json
import logging
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import pytest
import soundfile as sf
import torch

from diffiner.audio.folders import is_inside
from diffiner.commands import refine, resample_audio

from conftest import tiny_cli_flags, tiny_model_and_diffusion
from fs_helpers import deadline, deny_listing, output_digest, tree_digest

pytestmark = pytest.mark.slow  # every case walks and writes a random tree of files

TREES = 20
RATES = (8000, 16000, 22050, 44100, 48000)
FOLDER_NAMES = ("sub", "a b", "ünïcödé", "日本語", "x.wav", "..dots", "-dash", "v1.2", "д" * 127 + "x")
FILE_STEMS = ("f", "a b", "ñ", "音", ".hidden", "x.y", "-d", "UPPER", "long")
# Characters of 1 to 4 bytes in UTF-8 that long names are made of (a cut may not split one).
LONG_NAME_CHARS = ("a", "é", "語", "𝄞")
DEFAULT_OUTPUT = "diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6"
EXTENSIONS = (".wav", ".flac", ".WAV")
KINDS = ("good",) * 6 + ("empty", "garbage", "header only", "only noisy", "only processed")
# What the warning of a path that is skipped says after "PATH: ".
NOT_REGULAR = "not a regular file (a FIFO, socket or device); skipped"
LINK_TO_NOTHING = "a link to nothing; skipped"
# "N file(s) have no counterpart under ROOT_NAME (ROOT): rel, rel, ..."
NO_COUNTERPART = re.compile(r"(\d+) file\(s\) have no counterpart under (\S+) \((.*)\): (.*)")


@dataclass
class Tree:
    """What a run over the tree must do."""

    refined: Dict[str, Tuple[int, int, int]] = field(default_factory=dict)  # rel: (frames, rate, channels)
    failed: Set[str] = field(default_factory=set)  # rels and folder paths named as failures
    lonely: Dict[str, str] = field(default_factory=dict)  # rel on one side only: the root lacking it, warned
    skipped: Dict[str, str] = field(default_factory=dict)  # path that is not a regular file: its warning
    folders: List[str] = field(default_factory=list)  # relative folders holding files on both sides
    denied: List[str] = field(default_factory=list)  # folder paths that cannot be listed
    output: Optional[str] = None  # --output-dir relative to the base (None: the default inside proc)
    refused: bool = False  # the output folder holds inputs: the run must refuse it


def write(path: str, frames: int, rate: int, channels: int, rng: np.random.Generator, scale: float = 1.0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    audio = (0.3 * scale * rng.standard_normal((frames, channels))).astype(np.float32)
    fmt = "FLAC" if path.lower().endswith(".flac") else "WAV"
    sf.write(path, audio, rate, format=fmt, subtype="PCM_16")


def file_name(rnd: random.Random, i: int) -> str:
    """A name for the i-th file: one of FILE_STEMS, or for "long" one of 238 to 255 bytes."""
    stem, ext = rnd.choice(FILE_STEMS), rnd.choice(EXTENSIONS)
    if stem != "long":
        return f"{stem}{i}{ext}"
    char = rnd.choice(LONG_NAME_CHARS)
    room = rnd.randint(238, 255) - len(f"{i}{ext}")
    name = char * (room // len(char.encode())) + "z" * (room % len(char.encode())) + f"{i}{ext}"
    assert 238 <= len(name.encode()) <= 255
    return name


def build(base: str, seed: int) -> Tree:
    """A random pair of trees under base/noisy and base/proc (and base/outside, reached by links)."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    noisy, proc, outside = (os.path.join(base, name) for name in ("noisy", "proc", "outside"))
    os.makedirs(noisy)
    os.makedirs(proc)
    tree = Tree()
    for i in range(rnd.randint(3, 7)):
        folder = os.path.join("", *[rnd.choice(FOLDER_NAMES) for _ in range(rnd.randint(0, 3))])
        rel = os.path.join(folder, file_name(rnd, i))
        kind = rnd.choice(KINDS)
        frames, rate, channels = rnd.randint(1, 2000), rnd.choice(RATES), rnd.randint(1, 2)
        if kind == "only processed":
            write(os.path.join(proc, rel), frames, rate, channels, rng)
            tree.lonely[rel] = "noisy"
            continue
        write(os.path.join(noisy, rel), 0 if kind == "empty" else frames, rate, channels, rng)
        if kind == "only noisy":
            tree.lonely[rel] = "processed"
            continue
        out = os.path.join(proc, rel)
        write(out, 0 if kind == "empty" else frames, rate, channels, rng, scale=0.5)
        if kind == "garbage":
            with open(out, "wb") as f:
                f.write(b"RIFF" + bytes(rng.integers(0, 256, 60, dtype=np.uint8)))
        elif kind == "header only":
            with open(out, "r+b") as f:
                f.truncate(44 if fmt_of(out) == "WAV" else 30)
        if kind == "good":
            tree.refined[rel] = (frames, rate, channels)
            if folder:
                tree.folders.append(folder)
        else:
            tree.failed.add(rel)

    good = sorted(tree.refined)
    if good and rnd.random() < 0.5:  # a link to a file, on both sides: a pair of its own
        target = rnd.choice(good)
        for side in (noisy, proc):
            os.symlink(os.path.join(side, target), os.path.join(side, "linked.wav"))
        tree.refined["linked.wav"] = tree.refined[target]
    if tree.folders and rnd.random() < 0.5:  # a second way into a folder: listed once
        target = rnd.choice(tree.folders).split(os.sep)[0]
        for side in (noisy, proc):
            os.symlink(target, os.path.join(side, "alias"))
    if rnd.random() < 0.6:  # loops: to the parent and to the folder itself
        for side in (noisy, proc):
            os.symlink(".", os.path.join(side, "self"))
            for folder in tree.folders[:1]:
                os.symlink("..", os.path.join(side, folder, "up"))
    if rnd.random() < 0.4:  # folders outside the tree, reached by links
        frames, rate, channels = rnd.randint(1, 2000), rnd.choice(RATES), rnd.randint(1, 2)
        for side, scale in ((noisy, 1.0), (proc, 0.5)):
            target = os.path.join(outside, os.path.basename(side))
            write(os.path.join(target, "o.flac"), frames, rate, channels, rng, scale)
            os.symlink(target, os.path.join(side, "ext"))
        tree.refined[os.path.join("ext", "o.flac")] = (frames, rate, channels)
    if rnd.random() < 0.4:  # a FIFO where a processed file should be
        write(os.path.join(noisy, "z.wav"), 500, 16000, 1, rng)
        os.mkfifo(os.path.join(proc, "z.wav"))
        tree.lonely["z.wav"] = "processed"
        tree.skipped[os.path.join(proc, "z.wav")] = NOT_REGULAR
    if rnd.random() < 0.3:  # a link to nothing
        os.symlink(os.path.join(base, "gone.wav"), os.path.join(noisy, "broken.wav"))
        tree.skipped[os.path.join(noisy, "broken.wav")] = LINK_TO_NOTHING
    if tree.folders and rnd.random() < 0.3:  # a processed folder that cannot be listed
        top = rnd.choice(tree.folders).split(os.sep)[0]
        tree.denied.append(os.path.join(proc, top))
        tree.failed.add(os.path.join(proc, top))
        for rel in list(tree.refined) + list(tree.failed) + list(tree.lonely):
            if rel.startswith(top + os.sep):
                tree.refined.pop(rel, None)
                tree.failed.discard(rel)
                tree.lonely.pop(rel, None)
        # Reached through a link instead, the folder is listed: keep the tree simple.
        for side in (noisy, proc):
            if os.path.islink(os.path.join(side, "alias")):
                os.remove(os.path.join(side, "alias"))
    place_output(rnd, tree, base)
    return tree


def place_output(rnd: random.Random, tree: Tree, base: str) -> None:
    """Where the run writes: the default inside proc, a new folder inside noisy, one inside the
    folder that a link from noisy leads to, or a folder of noisy that holds inputs (refused)."""
    places = ["default", "default", "new inside noisy", "new inside noisy"]  # the refusal: rarer
    if os.path.islink(os.path.join(base, "noisy", "ext")):
        places.append("behind a link")
    if tree.folders:
        places.append("holding inputs")
    place = rnd.choice(places)
    if place == "new inside noisy":
        tree.output = os.path.join("noisy", rnd.choice([""] + tree.folders), "refined")
    elif place == "behind a link":
        tree.output = os.path.join("outside", "noisy", "refined")
    elif place == "holding inputs":
        tree.output = os.path.join("noisy", rnd.choice(tree.folders))
        tree.refused = True


def fmt_of(path: str) -> str:
    return "FLAC" if path.lower().endswith(".flac") else "WAV"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "tiny.pt")
    torch.save(tiny_model_and_diffusion()[0].state_dict(), path)
    return path


SIDES = ("noisy", "proc", "outside")


def digests_outside(base: str, out: str) -> Dict[str, Dict[str, str]]:
    """tree_digest of each side, without the files under the output folder `out`."""
    return {side: {rel: digest for rel, digest in tree_digest(os.path.join(base, side)).items()
                   if not is_inside(os.path.join(base, side, rel), out)} for side in SIDES}


@pytest.mark.parametrize("seed", range(TREES))
def test_random_tree(tmp_path, checkpoint, monkeypatch, caplog, capsys, seed):
    tree = build(str(tmp_path), seed)
    inputs = {side: tree_digest(str(tmp_path / side)) for side in SIDES}
    out = str(tmp_path / tree.output) if tree.output else str(tmp_path / "proc" / DEFAULT_OUTPUT)
    output_flags = ["--output-dir", out] if tree.output else []
    caplog.set_level(logging.INFO)
    with monkeypatch.context() as patch:
        if tree.denied:
            deny_listing(patch, *tree.denied)
        with deadline(90):
            code = refine.main(["--root-noisy", str(tmp_path / "noisy"), "--root-proc", str(tmp_path / "proc"),
                                "--model-path", checkpoint, "--no-gpu", "--no-progress", "--keep-sample-rate",
                                *output_flags, *tiny_cli_flags("ddim2")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if tree.refused:
        assert code == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [
            line for line in err.splitlines() if "lies inside the input folder --root-noisy" in line], err
        assert {side: tree_digest(str(tmp_path / side)) for side in SIDES} == inputs, "something was written"
        return
    assert digests_outside(str(tmp_path), out) == inputs, "an input file changed"

    summary = json.load(open(os.path.join(out, "summary.json")))
    for rel, (frames, rate, channels) in tree.refined.items():
        assert os.path.isfile(os.path.join(out, rel)), (rel, summary["failed"].get(rel))
        info = sf.info(os.path.join(out, rel))
        assert (info.frames, info.samplerate, info.channels) == (frames, rate, channels), rel
    written = set(output_digest(out)) - {"config.yml", "summary.json"}
    assert written == set(tree.refined)
    assert set(summary["failed"]) == tree.failed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # Each lonely file named, whole, in the warning of the root that lacks it (no other file named):
    # a list item, not a substring (f1.wav is not named by f11.wav).
    named = {}
    for message in warnings:
        match = NO_COUNTERPART.fullmatch(message)
        if match:
            count, root, _, listed = match.groups()
            assert root not in named, message  # one warning per root
            named[root] = listed.split(", ")
            assert int(count) == len(named[root]), message  # the trees are small: none left off
    assert {root: sorted(rels) for root, rels in named.items()} == \
        {root: sorted(rel for rel, lacking in tree.lonely.items() if lacking == root)
         for root in set(tree.lonely.values())}
    # Each skipped path in a warning of its own, saying why.
    for path, reason in tree.skipped.items():
        assert f"{path}: {reason}" in warnings, (path, warnings)
    assert code == (1 if tree.failed else 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(0, TREES, 4))
def test_two_runs_at_once_into_one_folder_inside_the_input(tmp_path, seed):
    """Two resampling runs of the noisy tree into noisy/out, started together: A to 16 kHz, B to
    8 kHz with --overwrite. Each either does its whole run or is refused before writing
    anything, naming the other (A, arriving after B has finished, is refused for its other
    --rate); the folder ends as one run alone leaves it (B's, unless B was refused), never a
    mixture, and no input byte changed."""
    build(str(tmp_path), seed)
    noisy, out = str(tmp_path / "noisy"), str(tmp_path / "noisy" / "out")
    inputs = {side: tree_digest(str(tmp_path / side)) for side in SIDES}
    flags = {"A": ["--rate", "16000"], "B": ["--rate", "8000", "--overwrite"]}
    alone = {}  # first: an output folder inside noisy would be their input
    for name, extra in flags.items():
        code = resample_audio.main([noisy, str(tmp_path / name), "--no-progress", *extra])
        alone[name] = (code, output_digest(str(tmp_path / name)))
    runs = {name: subprocess.Popen([sys.executable, "-m", "diffiner.commands.resample_audio", noisy, out,
                                    "--no-progress", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True) for name, extra in flags.items()}
    ended = {name: (run.wait(120), run.stderr.read()) for name, run in runs.items()}
    for run in runs.values():
        run.stderr.close()
    for name, other in (("A", "B"), ("B", "A")):
        code, err = ended[name]
        assert "Traceback" not in err
        if code == 2:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            after_b = name == "A" and "wrote with other settings (rate: 8000 -> 16000)" in err
            assert len(errors) == 1 and (f"in use by diffiner-resample (pid {runs[other].pid} " in errors[0]
                                         or after_b), err
        else:
            assert code == alone[name][0], err
    assert [ended["A"][0], ended["B"][0]].count(2) <= 1
    assert output_digest(out) == alone["A" if ended["B"][0] == 2 else "B"][1], "the runs mixed their files"
    assert digests_outside(str(tmp_path), out) == inputs, "an input file changed"
