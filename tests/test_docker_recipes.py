"""The Docker recipes, checked without a Docker engine.

Each `Dockerfile_*` at the repository root has its pip steps resolved the way its build runs
them: the same requirements, in the same order, held to the image's constraint file, by pip in
a virtual environment of the image's Python (`ARG PYTHON_VERSION`). Steps that only upgrade
pip, setuptools and wheel are installed for real in that environment, since they decide how
the later steps resolve; every other step is a `pip install --dry-run --ignore-installed`
(nothing of the base image counts as installed): pip fetches metadata, prepares that of source
distributions, and builds or installs nothing. What an earlier step chose is pinned for the later ones, as in the image, where it
is already installed. The environments are kept in `.venv-docker-resolve/` (git-ignored).

The start script is checked with `--dry-run` and a stand-in `nvidia-smi`, and NISQA's absence
from the torch 1.11 image (no torchmetrics there) with its messages.
"""

import csv
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "Dockerfile_*")))
VENVS = os.path.join(ROOT, ".venv-docker-resolve")
START = os.path.join(ROOT, "start-container_diffiner.sh")
PACKAGING_TOOLS = {"pip", "setuptools", "wheel"}
# The caller's settings that describe how to reach the index; every other PIP_* variable (local
# wheel folders, this machine's constraints) would make the resolution differ from the image's.
INDEX_ACCESS = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_PROXY",
                "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES")


@dataclass
class Recipe:
    python_version: Optional[str] = None
    pip_env: Dict[str, str] = field(default_factory=dict)  # the image's PIP_* variables
    files: Dict[str, List[str]] = field(default_factory=dict)  # files written with printf: path -> lines
    copy_destination: Optional[str] = None  # where `COPY . DEST` puts the checkout
    workdir: Optional[str] = None
    pip_steps: List[List[str]] = field(default_factory=list)  # the arguments after `pip install`


def instructions(text: str):
    """(keyword, arguments) of each instruction, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for instruction in "\n".join(lines).replace("\\\n", " ").splitlines():
        if instruction.strip():
            keyword, _, rest = instruction.strip().partition(" ")
            yield keyword.upper(), rest.strip()


def parse_recipe(text: str) -> Recipe:
    recipe = Recipe()
    for keyword, rest in instructions(text):
        if keyword == "ARG" and rest.startswith("PYTHON_VERSION="):
            recipe.python_version = rest.partition("=")[2]
        elif keyword == "ENV":
            for assignment in shlex.split(rest):
                name, _, value = assignment.partition("=")
                if name.startswith("PIP_"):
                    recipe.pip_env[name] = value
        elif keyword == "COPY" and shlex.split(rest)[0] == ".":
            recipe.copy_destination = shlex.split(rest)[-1]
        elif keyword == "WORKDIR":
            recipe.workdir = rest
        elif keyword == "RUN":
            tokens = shlex.split(rest)
            commands, current = [], []
            for token in tokens + ["&&"]:
                if token == "&&":
                    commands.append(current)
                    current = []
                else:
                    current.append(token)
            for command in commands:
                if command[:2] == ["pip", "install"]:
                    recipe.pip_steps.append(command[2:])
                elif command[:1] == ["printf"] and ">" in command:
                    target = command.index(">")
                    recipe.files[command[target + 1]] = command[2:target]
    return recipe


def requirement_names(arguments: List[str]) -> List[str]:
    """Project names of the requirements among pip install's arguments (options left out)."""
    names = []
    for argument in arguments:
        if not argument.startswith("-"):
            name = argument
            for stop in "<>=!~[; ":
                name = name.split(stop)[0]
            names.append(name.lower())
    return names


def find_python(version: str) -> Optional[str]:
    """A working interpreter of `version`: pyenv's builds first (its shims on PATH fail for a
    version that is not selected), then pythonX.Y on PATH."""
    candidates = []
    for root in (os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv"), "/root/.pyenv"):
        if root:
            candidates += sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")),
                                 reverse=True)
    candidates.append(shutil.which(f"python{version}"))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    return None


def pip_environment(recipe: Recipe, constraints: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") or k in INDEX_ACCESS}
    env.pop("PYTHONPATH", None)
    env.update(recipe.pip_env, PIP_CONFIG_FILE=os.devnull, PIP_CONSTRAINT=constraints, PYTHONNOUSERSITE="1")
    return env


def image_venv(version: str) -> str:
    """A virtual environment of the image's Python, created once and reused."""
    python = find_python(version)
    if python is None:
        pytest.skip(f"no Python {version} interpreter here (the image's); e.g. `pyenv install {version}`")
    venv = os.path.join(VENVS, f"py{version}")
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        subprocess.run([python, "-m", "venv", "--clear", venv], check=True, capture_output=True)
    return os.path.join(venv, "bin", "python")


def index_reachable(python: str, env: Dict[str, str]) -> bool:
    result = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--dest", os.path.join(VENVS, "probe"),
                             "--only-binary", ":all:", "six"], env=env, capture_output=True, text=True, timeout=120)
    return result.returncode == 0


def local_path(argument: str, recipe: Recipe) -> str:
    """The checkout for `.` (and `.[extras]`) when the build runs in the folder it copied it to."""
    if argument.startswith("."):
        assert recipe.workdir == recipe.copy_destination, "pip's '.' must be the copied checkout"
        return ROOT + argument[1:]
    return argument


def resolve_recipe(name: str, tmp_path) -> Tuple[Recipe, List[Dict[str, str]]]:
    """Run the recipe's pip steps as described above: the recipe, and the versions each dry-run
    step chose."""
    with open(os.path.join(ROOT, name)) as f:
        recipe = parse_recipe(f.read())
    assert recipe.python_version, f"{name}: declare the image's Python as ARG PYTHON_VERSION=X.Y"
    assert recipe.pip_steps, f"{name}: no pip install step found"
    python = image_venv(recipe.python_version)
    image_constraints = recipe.files.get(recipe.pip_env.get("PIP_CONSTRAINT", ""), [])
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(image_constraints) + "\n")
    env = pip_environment(recipe, str(constraints))
    if not index_reachable(python, env):
        pytest.skip("the package index is not reachable (offline?)")
    chosen: List[Dict[str, str]] = []
    for step, arguments in enumerate(recipe.pip_steps):
        arguments = [local_path(a, recipe) for a in arguments]
        if set(requirement_names(arguments)) <= PACKAGING_TOOLS:
            command = [python, "-m", "pip", "install", *arguments]
        else:
            report = tmp_path / f"step{step}.json"
            command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(report),
                       *arguments]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR") and "Ignored" not in line]
        assert result.returncode == 0, f"{name}: `pip install {' '.join(arguments)}` fails:\n" + "\n".join(errors[-8:])
        if "--dry-run" in command:
            with open(report) as f:
                installs = json.load(f)["install"]
            chosen.append({item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs})
            # Later steps find these installed, as in the image (the checkout is not an index package).
            pins = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in installs
                    if not item.get("is_direct")]
            constraints.write_text(constraints.read_text() + "\n".join(pins) + "\n")
    return recipe, chosen


@pytest.mark.slow  # creates environments and asks the package index; about a minute per recipe
@pytest.mark.parametrize("name", RECIPES)
def test_the_recipes_pip_steps_resolve_for_the_images_python(name, tmp_path):
    recipe, chosen = resolve_recipe(name, tmp_path)
    pinned = dict(line.split("==") for line in recipe.files[recipe.pip_env["PIP_CONSTRAINT"]] if "==" in line)
    assert pinned.get("torch"), f"{name}: the constraints must pin torch"
    final = chosen[-1]
    assert "diffiner" in final, f"{name}: the last pip step does not install the checkout"
    for step in chosen:  # no step may bring another torch than the image's
        assert step.get("torch", pinned["torch"]) == pinned["torch"]


def test_the_parser_reads_the_old_recipe_as_its_build_runs_it():
    with open(os.path.join(ROOT, "Dockerfile_torch1p11_diffiner")) as f:
        recipe = parse_recipe(f.read())
    assert recipe.python_version == "3.8"
    assert recipe.files[recipe.pip_env["PIP_CONSTRAINT"]] == ["torch==1.11.0", "numpy<1.25"]
    assert recipe.pip_steps[0] == ["--upgrade", "pip<25.1", "setuptools>=64,<76", "wheel"]
    assert requirement_names(recipe.pip_steps[0]) == ["pip", "setuptools", "wheel"]
    assert recipe.pip_steps[-1][-1].startswith(".[") and recipe.workdir == recipe.copy_destination


def test_nisqa_is_left_out_with_a_reason_where_torchmetrics_is_not_installed(monkeypatch, caplog):
    """The torch 1.11 image has no torchmetrics: evaluation picks the other metrics and says why
    NISQA is missing; asking for NISQA there is a one-line error naming what to install."""
    from diffiner.evaluation import scoring

    real = scoring.importlib.util.find_spec
    monkeypatch.setattr(scoring.importlib.util, "find_spec",
                        lambda module, *a: None if module == "torchmetrics" else real(module, *a))
    with caplog.at_level("WARNING"):
        chosen = scoring.resolve_metrics(None, has_clean=True)
    assert "nisqa" not in chosen and "sisdr" in chosen
    assert "nisqa skipped: torchmetrics" in caplog.text
    with pytest.raises(scoring.EvaluationError, match="nisqa needs torchmetrics"):
        scoring.resolve_metrics(["nisqa"], has_clean=True)


def test_an_old_torchmetrics_without_nisqa_is_a_one_line_error(monkeypatch, tmp_path):
    """`pip install torchmetrics` under the torch 1.11 image's constraints brings a torchmetrics
    older than 1.6, without NISQA: loading the weights says what is needed instead of an
    ImportError's traceback."""
    from diffiner.evaluation import nisqa

    weights = tmp_path / nisqa.WEIGHTS_NAME
    weights.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torchmetrics.functional.audio.nisqa", None)  # import fails
    with pytest.raises(nisqa.NisqaWeightsError, match=r"needs torchmetrics >= 1\.6") as raised:
        nisqa.load_weights(str(weights))
    assert isinstance(raised.value, nisqa.NisqaUnavailable) and "\n" not in str(raised.value)


def fake_nvidia_smi(folder, capability: str) -> Dict[str, str]:
    """PATH with an nvidia-smi that lists one GPU of the given compute capability."""
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, {capability}'\n")
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.slow  # runs the start script in bash
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_start_script_serves_both_recipes(tmp_path):
    hopper = fake_nvidia_smi(tmp_path / "bin", "9.0")
    new = subprocess.run(["bash", START, "--dry-run", "--build", "--gpus", "0"], env=hopper,
                         capture_output=True, text=True)
    assert new.returncode == 0, new.stderr
    assert "Dockerfile_torch2p13_cuda13_diffiner" in new.stdout and "diffiner:torch2.13" in new.stdout
    # The old recipe has no Hopper kernels: refused before anything is built.
    old = subprocess.run(["bash", START, "--recipe", "torch1.11", "--dry-run", "--build", "--gpus", "0"],
                         env=hopper, capture_output=True, text=True)
    assert old.returncode == 2 and old.stdout == ""
    assert "compute capability 9.0" in old.stderr and "--recipe torch2.13" in old.stderr
    assert len(old.stderr.strip().splitlines()) == 1
    # On an Ampere card the old recipe runs, also under the script's old name.
    ampere = fake_nvidia_smi(tmp_path / "bin", "8.0")
    legacy = subprocess.run(["bash", os.path.join(ROOT, "start-container-torch1p11_diffiner.sh"), "--dry-run",
                             "--build", "--gpus", "0"], env=ampere, capture_output=True, text=True)
    assert legacy.returncode == 0, legacy.stderr
    assert "Dockerfile_torch1p11_diffiner" in legacy.stdout and "diffiner:torch1.11" in legacy.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", ["corpus:2024", "a,b", 'say "hi"', "plain"])
def test_the_start_script_mounts_any_folder_name_as_given(tmp_path, name):
    """docker's -v splits its value at ':' (a data folder "corpus:2024" became a mount of
    "corpus" at "2024:/data"); the --mount form takes any path, its fields quoted as CSV."""
    data, repo = tmp_path / name / "data", tmp_path / name / "repo"
    data.mkdir(parents=True)
    repo.mkdir()
    shown = subprocess.run(["bash", START, "--dry-run", "--gpus", "none", "--data", str(data), "--repo", str(repo)],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    args = shlex.split(shown.stdout)
    assert "-v" not in args and "--volume" not in args
    mounts = {}
    for flag, value in zip(args, args[1:]):
        if flag == "--mount":
            fields = dict(field.split("=", 1) for field in next(csv.reader([value])))
            assert fields["type"] == "bind"
            mounts[fields["target"]] = fields["source"]
    assert mounts == {"/data": str(data), "/workspace/diffiner": str(repo)}
