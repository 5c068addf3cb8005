"""One rule for every writer (refiner, enhancers, resampler, demo data): never onto an input, never
into a root it reads except into its own output folder, never reading an output as input; and a
write that fails (full disk, read-only folder) is one line naming the file, not a traceback."""

import importlib
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile as sf

from diffiner import __version__, commands
from diffiner.audio.folders import LOCK_FILE
from diffiner.commands import enhance, evaluate, make_noisy_set, pretrained, refine, resample_audio, sample_prior, train
from diffiner.errors import UsageError

from conftest import speech_like, tiny_cli_flags, write_wav
from fs_helpers import deadline, deny_writing, fill_disk, output_digest, tree_digest


@pytest.fixture
def originals(tmp_path):
    """96 kHz / 24-bit originals, the case that was turned into 16 kHz / 16-bit in place."""
    root = tmp_path / "orig"
    write_wav(str(root / "a.wav"), speech_like(0.3, 96000, seed=1), 96000, subtype="PCM_24")
    write_wav(str(root / "sub" / "b.wav"), speech_like(0.2, 96000, seed=2), 96000, subtype="PCM_24")
    return str(root)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_resampling_a_folder_onto_itself_is_refused(originals, capsys):
    before = tree_digest(originals)
    assert resample_audio.main([originals, originals, "--overwrite"]) == 2
    assert "is the input folder" in one_error_line(capsys.readouterr().err)
    assert tree_digest(originals) == before


def test_resampling_into_a_folder_that_contains_the_input_is_refused(originals, capsys):
    before = tree_digest(originals)
    assert resample_audio.main([originals, os.path.dirname(originals), "--overwrite"]) == 2
    assert "contains the input folder" in one_error_line(capsys.readouterr().err)
    assert tree_digest(originals) == before


def test_an_output_folder_inside_the_input_is_written_and_never_read_back(originals, capsys):
    out = os.path.join(originals, "16kHz")
    before = tree_digest(originals)
    assert resample_audio.main([originals, out, "--no-progress"]) == 0
    assert sf.info(os.path.join(out, "sub", "b.wav")).samplerate == 16000
    assert resample_audio.main([originals, out, "--no-progress"]) == 0
    assert "0 written, 2 already there, 0 failed" in capsys.readouterr().out
    assert {rel: d for rel, d in tree_digest(originals).items() if not rel.startswith("16kHz")} == before


def test_enhancing_a_folder_onto_itself_is_refused(originals, capsys):
    pytest.importorskip("noisereduce")
    before = tree_digest(originals)
    assert enhance.main([originals, originals, "--enhancer", "noisereduce", "--overwrite"]) == 2
    assert "is the input folder" in one_error_line(capsys.readouterr().err)
    assert tree_digest(originals) == before


def test_enhancer_flag_and_its_old_spelling(originals, tmp_path):
    """--name is --enhancer: `--name none` gives what `--enhancer none` gives, not the default's
    (noisereduce's) outputs."""
    pytest.importorskip("noisereduce")
    outputs = {}
    for key, flags in {"enhancer": ["--enhancer", "none"], "name": ["--name", "none"],
                       "default": ["--enhancer", "noisereduce"]}.items():
        assert enhance.main([originals, str(tmp_path / key), *flags]) == 0
        outputs[key] = {rel: sf.read(str(tmp_path / key / rel), dtype="float32")
                        for rel in sorted(output_digest(str(tmp_path / key))) if rel.endswith(".wav")}
    assert list(outputs["enhancer"]) == list(outputs["name"]) == list(outputs["default"]) == \
        ["a.wav", os.path.join("sub", "b.wav")]
    for rel, (audio, rate) in outputs["name"].items():
        expected, expected_rate = outputs["enhancer"][rel]
        assert rate == expected_rate and np.array_equal(audio, expected), rel
        denoised, _ = outputs["default"][rel]
        assert audio.shape == denoised.shape and not np.allclose(audio, denoised, atol=1e-3), rel


def test_demo_noise_onto_the_clean_folder_is_refused(originals, capsys):
    before = tree_digest(originals)
    assert make_noisy_set.main([originals, originals]) == 2
    assert "is the input folder" in one_error_line(capsys.readouterr().err)
    assert tree_digest(originals) == before


def refine_args(noisy, proc, checkpoint, *extra):
    return ["--root-noisy", noisy, "--root-proc", proc, "--model-path", checkpoint, "--no-gpu", "--no-progress",
            *tiny_cli_flags(), *extra]


def test_a_baseline_written_onto_the_noisy_folder_is_refused(originals, tiny_checkpoint, capsys):
    before = tree_digest(originals)
    code = refine.main(refine_args(originals, originals, tiny_checkpoint, "--baseline", "noisereduce",
                                   "--overwrite"))
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--root-noisy" in line and "--root-proc" in line and "same folder" in line
    assert tree_digest(originals) == before


def test_noisy_and_processed_the_same_folder_is_refused(originals, tiny_checkpoint, capsys):
    before = tree_digest(originals)
    assert refine.main(refine_args(originals, originals, tiny_checkpoint)) == 2
    assert "same folder" in one_error_line(capsys.readouterr().err)
    assert tree_digest(originals) == before


@pytest.mark.parametrize("where", ["noisy", "proc", "parent"])
def test_a_refined_folder_onto_or_around_an_input_is_refused(tmp_path, tiny_checkpoint, capsys, where):
    for side in ("noisy", "proc"):
        write_wav(str(tmp_path / side / "a.wav"), speech_like(0.3, 16000), 16000)
    before = tree_digest(str(tmp_path))
    out = {"noisy": tmp_path / "noisy", "proc": tmp_path / "proc", "parent": tmp_path}[where]
    code = refine.main(refine_args(str(tmp_path / "noisy"), str(tmp_path / "proc"), tiny_checkpoint,
                                   "--output-dir", str(out)))
    assert code == 2
    one_error_line(capsys.readouterr().err)
    assert tree_digest(str(tmp_path)) == before


def test_overwrite_never_deletes_through_a_link_out_of_the_output_folder(tmp_path, tiny_checkpoint, capsys):
    """--overwrite removes the files of a refinement with other settings: only those inside the
    output folder, never what a link in it leads to (here: the noisy recordings themselves)."""
    for side in ("noisy", "proc"):
        write_wav(str(tmp_path / side / "a.wav"), speech_like(0.3, 16000), 16000)
    out = tmp_path / "out"
    args = refine_args(str(tmp_path / "noisy"), str(tmp_path / "proc"), tiny_checkpoint, "--output-dir", str(out))
    assert refine.main(args) == 0
    os.symlink(str(tmp_path / "noisy"), str(out / "linked"))
    inputs = {side: tree_digest(str(tmp_path / side)) for side in ("noisy", "proc")}
    capsys.readouterr()
    assert refine.main(args + ["--seed", "1", "--overwrite"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().out
    assert {side: tree_digest(str(tmp_path / side)) for side in ("noisy", "proc")} == inputs
    assert (out / "a.wav").is_file()


def test_a_full_disk_is_one_line_naming_the_file(originals, tmp_path, monkeypatch, capsys):
    fill_disk(monkeypatch, after=1)
    out = str(tmp_path / "out")
    assert resample_audio.main([originals, out, "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "b.wav" in line and "System error" in line and "free" in line
    assert output_digest(out).keys() == {"a.wav"}  # the file before it is whole, no temporary left


def test_a_read_only_output_folder_is_refused_before_any_work(originals, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    deny_writing(monkeypatch, out)
    assert resample_audio.main([originals, out, "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert out in line and "Permission denied" in line
    assert tree_digest(out) == {}


def test_an_output_path_below_a_file_is_one_line(originals, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert resample_audio.main([originals, str(blocker / "out"), "--no-progress"]) == 2
    assert str(blocker) in one_error_line(capsys.readouterr().err)


def failing_invocations(tmp):
    """{command name: (module, arguments that fail before any work, what the error names)}: a
    missing input folder, or for the commands that need a checkpoint first, a missing one."""
    nowhere, missing = os.path.join(tmp, "nowhere"), os.path.join(tmp, "missing.pt")
    for side in ("noisy", "proc"):
        write_wav(os.path.join(tmp, side, "a.wav"), speech_like(0.1, 16000), 16000)
    return {
        "refine": (refine, ["--root-noisy", os.path.join(tmp, "noisy"), "--root-proc", os.path.join(tmp, "proc"),
                            "--model-path", missing, "--no-gpu", "--no-progress"], "missing.pt"),
        "train": (train, ["--root", nowhere, "--log_dir", os.path.join(tmp, "log")], "nowhere"),
        "sample_prior": (sample_prior, ["--model_path", missing, "--output_dir", os.path.join(tmp, "s")],
                         "missing.pt"),
        "evaluate": (evaluate, ["--system", f"x={nowhere}", "--output_dir", os.path.join(tmp, "e"), "--workers", "1"],
                     "nowhere"),
        "enhance": (enhance, [nowhere, os.path.join(tmp, "out"), "--enhancer", "none"], "nowhere"),
        "resample_audio": (resample_audio, [nowhere, os.path.join(tmp, "out")], "nowhere"),
        "make_noisy_set": (make_noisy_set, [nowhere, os.path.join(tmp, "out")], "nowhere"),
        "pretrained": (pretrained, [missing], "missing.pt"),
    }


COMMANDS = sorted(name[:-3] for name in os.listdir(os.path.dirname(commands.__file__))
                  if name.endswith(".py") and name not in ("__init__.py", "common.py"))


@pytest.mark.parametrize("name", COMMANDS)  # every module of diffiner/commands/, a new one included
def test_every_command_takes_debug_and_then_shows_the_traceback(name, tmp_path, capsys):
    invocations = failing_invocations(str(tmp_path))
    assert sorted(invocations) == COMMANDS, "give every command a failing invocation"
    command, args, named = invocations[name]
    assert command.main(args) == 2
    assert named in one_error_line(capsys.readouterr().err)
    with pytest.raises(UsageError, match=re.escape(named)):
        command.main([*args, "--debug"])
    assert "error:" not in capsys.readouterr().err  # propagated, not turned into a line


def entry_point_modules():
    """{module name: console script} of setup.py's entry points, and the modules of
    diffiner/commands/ that have none (make_noisy_set): every command, a new one included."""
    setup_py = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    scripts = {module: script for script, module in
               re.findall(r'"([\w-]+)\s*=\s*diffiner\.commands\.(\w+):main"', setup_py)}
    assert scripts, "no console_scripts found in setup.py"
    return {name: scripts.get(name, f"python -m diffiner.commands.{name}") for name in COMMANDS + sorted(scripts)}


# diffiner-train's flags are issue 16 item 5's (its console: one bar with the loss): not yet here.
CONSOLE_COMMANDS = sorted(set(entry_point_modules()) - {"train"})


@pytest.mark.parametrize("name", CONSOLE_COMMANDS)
def test_every_command_takes_version_no_progress_and_quiet(name, tmp_path, capsys):
    """--version prints and exits 0; --no-progress and --quiet are accepted (the run then fails
    on its missing input, with that one line, not on argparse's "unrecognized arguments")."""
    command = importlib.import_module(f"diffiner.commands.{name}")
    with pytest.raises(SystemExit) as exit_:
        command.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f"(diffiner) {__version__}")
    _, args, named = failing_invocations(str(tmp_path))[name]
    assert command.main([*args, "--no-progress", "--quiet"]) == 2
    assert named in one_error_line(capsys.readouterr().err)


def test_quiet_prints_only_the_closing_line_and_no_progress_no_bar(originals, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert resample_audio.main([originals, out, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "resampling" not in captured.err and "|" not in captured.err  # no tqdm bar
    os.remove(os.path.join(out, "a.wav"))
    assert resample_audio.main([originals, out, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"resampled to 16000 Hz in {out}: 1 written, 1 already there, 0 failed"]
    assert captured.err == ""


def test_quiet_evaluation_prints_where_the_results_are_only(tmp_path, capsys):
    for folder in ("clean", "sys"):
        write_wav(str(tmp_path / folder / "a.wav"), speech_like(0.5, 16000), 16000)
    out = str(tmp_path / "out")
    assert evaluate.main(["--clean", str(tmp_path / "clean"), "--system", f"s={tmp_path / 'sys'}", "--metrics",
                          "sisdr", "--workers", "1", "--output-dir", out, "--num-plot-files", "0", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"results written to {out}"] and captured.err == ""
    assert os.path.isfile(os.path.join(out, "summary.md"))  # the table is there, not on the terminal


def test_quiet_refinement_prints_its_summary_only(tmp_path, tiny_checkpoint, capsys):
    for side in ("noisy", "proc"):
        write_wav(str(tmp_path / side / "a.wav"), speech_like(0.3, 16000), 16000)
    args = refine_args(str(tmp_path / "noisy"), str(tmp_path / "proc"), tiny_checkpoint,
                       "--output-dir", str(tmp_path / "out"))
    assert refine.main([a for a in args if a != "--no-progress"] + ["--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("refined 1 file(s), skipped 0, failed 0"), lines


@pytest.mark.parametrize("command, extra", [(resample_audio, []), (enhance, ["--enhancer", "none"]),
                                            (make_noisy_set, [])])
def test_a_missing_input_folder_is_one_line_with_status_2(command, extra, tmp_path, capsys):
    assert command.main([str(tmp_path / "nowhere"), str(tmp_path / "out"), *extra]) == 2
    assert "nowhere" in one_error_line(capsys.readouterr().err)


def test_silent_clean_file_in_the_demo_set_is_one_line(tmp_path, capsys):
    write_wav(str(tmp_path / "clean" / "s.wav"), np.zeros(1600, dtype=np.float32), 16000)
    assert make_noisy_set.main([str(tmp_path / "clean"), str(tmp_path / "noisy")]) == 1
    assert "s.wav" in capsys.readouterr().err


# ----- an output folder inside an input folder -----

def user_files_under_out(root: str) -> str:
    """IN/x.wav and the user's own IN/sub/x.wav: the file that a run from IN into IN/sub would
    write over (or, without --overwrite, take for its output)."""
    write_wav(os.path.join(root, "x.wav"), speech_like(0.3, 16000, seed=1), 16000)
    write_wav(os.path.join(root, "sub", "x.wav"), speech_like(0.2, 8000, seed=2), 8000)
    return os.path.join(root, "sub")


NESTED_RUNS = {
    "resample --overwrite": lambda root, out: resample_audio.main([root, out, "--overwrite", "--no-progress"]),
    "resample": lambda root, out: resample_audio.main([root, out, "--no-progress"]),
    "enhance --overwrite": lambda root, out: enhance.main([root, out, "--enhancer", "none", "--overwrite",
                                                            "--no-progress"]),
    "make_noisy_set": lambda root, out: make_noisy_set.main([root, out, "--no-progress"]),
}


@pytest.mark.parametrize("run", sorted(NESTED_RUNS))
def test_an_output_folder_inside_the_input_holding_inputs_is_refused(run, tmp_path, capsys):
    root = str(tmp_path / "in")
    out = user_files_under_out(root)
    before = tree_digest(root)
    assert NESTED_RUNS[run](root, out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "lies inside the input folder" in line and "holds 1 audio file(s), e.g. x.wav" in line
    assert tree_digest(root) == before  # not a byte written, not even a lock file


def test_a_baseline_into_a_processed_folder_inside_the_noisy_one_is_refused(tmp_path, tiny_checkpoint, capsys):
    pytest.importorskip("noisereduce")
    root = str(tmp_path / "in")
    out = user_files_under_out(root)
    before = tree_digest(root)
    assert refine.main(refine_args(root, out, tiny_checkpoint, "--baseline", "noisereduce", "--overwrite")) == 2
    assert "lies inside the input folder" in one_error_line(capsys.readouterr().err)
    assert tree_digest(root) == before


def test_a_nested_output_folder_is_resumed_by_its_writer_only(originals, capsys):
    out = os.path.join(originals, "16kHz")
    assert resample_audio.main([originals, out, "--no-progress"]) == 0
    written = output_digest(out)
    assert enhance.main([originals, out, "--enhancer", "none", "--overwrite", "--no-progress"]) == 2
    assert "written by diffiner-resample, not diffiner-enhance" in one_error_line(capsys.readouterr().err)
    assert output_digest(out) == written
    assert resample_audio.main([originals, out, "--no-progress", "--overwrite"]) == 0
    assert "2 written, 0 already there" in capsys.readouterr().out


def test_an_evaluation_inside_a_system_folder_holding_audio_is_refused(tmp_path, capsys):
    clean, system = tmp_path / "clean", tmp_path / "sys"
    for folder in (clean, system):
        write_wav(str(folder / "a.wav"), speech_like(0.5, 16000), 16000)
    write_wav(str(system / "listening" / "a.wav"), speech_like(0.5, 16000, seed=3), 16000)
    before = tree_digest(str(tmp_path))
    code = evaluate.main(["--clean", str(clean), "--system", f"s={system}", "--metrics", "sisdr", "--workers", "1",
                          "--output-dir", str(system / "listening"), "--num-plot-files", "0"])
    assert code == 2
    assert "lies inside the input folder s" in one_error_line(capsys.readouterr().err)
    assert tree_digest(str(tmp_path)) == before


# ----- names up to the file system's limit -----

def names_of_every_length(shortest: int = 238, longest: int = 255):
    """.wav names of each length in bytes from `shortest` to `longest`, in characters of 1 to 4
    bytes of UTF-8 (a cut may not split one)."""
    names = []
    for char in ("a", "é", "語", "𝄞"):
        width = len(char.encode())
        for size in range(shortest, longest + 1):
            stem = size - len(".wav")
            names.append(char * (stem // width) + "z" * (stem % width) + ".wav")
    assert {len(name.encode()) for name in names} == set(range(shortest, longest + 1))
    return names


def test_names_up_to_255_bytes_are_all_written(tmp_path, capsys):
    names = names_of_every_length()
    for k, name in enumerate(names):
        write_wav(str(tmp_path / "in" / name), np.full(96, 0.01 * (k % 50), np.float32), 48000)
    out = str(tmp_path / "out")
    assert resample_audio.main([str(tmp_path / "in"), out, "--no-progress"]) == 0
    assert f"{len(names)} written, 0 already there, 0 failed" in capsys.readouterr().out
    assert sorted(output_digest(out)) == sorted(names)
    assert all(sf.info(os.path.join(out, name)).frames == 32 for name in names)


# ----- the writability probe and the lock file in a shared folder -----

def test_the_writability_probe_never_writes_through_a_planted_link(originals, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    out = tmp_path / "shared"
    out.mkdir()
    os.symlink(str(victim), str(out / f".tmp-write-test-{os.getpid()}"))  # the name the probe used to take
    assert resample_audio.main([originals, str(out), "--no-progress"]) == 0
    assert victim.read_text() == "someone else's file"
    assert os.path.islink(str(out / f".tmp-write-test-{os.getpid()}"))  # left alone, and no probe left
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-") and not os.path.islink(out / name)]


def test_a_lock_file_planted_as_a_link_is_refused_and_not_written_through(originals, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    out = tmp_path / "shared"
    out.mkdir()
    os.symlink(str(victim), str(out / LOCK_FILE))
    assert resample_audio.main([originals, str(out), "--no-progress"]) == 2
    assert "is a link" in one_error_line(capsys.readouterr().err)
    assert victim.read_text() == "someone else's file"
    assert output_digest(str(out)) == {}


# ----- one run per output folder -----

def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(originals, tmp_path, monkeypatch, capsys):
    """Run A is held inside its first file; run B, into the same folder, is refused before it
    writes anything, with A named; A then finishes every file."""
    out = str(tmp_path / "out")
    inside, release = threading.Event(), threading.Event()
    real = resample_audio.resample
    calls = []

    def first_call_waits(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            inside.set()
            assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(resample_audio, "resample", first_call_waits)
    codes = {}
    run_a = threading.Thread(name="A", target=lambda: codes.update(
        A=resample_audio.main([originals, out, "--no-progress", "--rate", "8000"])))
    run_a.start()
    try:
        assert inside.wait(30)
        codes["B"] = resample_audio.main([originals, out, "--no-progress", "--overwrite"])
    finally:
        release.set()
        run_a.join(30)
    assert codes == {"A": 0, "B": 2} and calls == ["A", "A"]
    line = one_error_line(capsys.readouterr().err)
    assert f"{out}: in use by diffiner-resample (pid {os.getpid()} on {socket.gethostname()}" in line
    assert all(sf.info(os.path.join(out, rel)).samplerate == 8000 for rel in output_digest(out))


@pytest.mark.slow
def test_a_run_is_refused_while_another_process_holds_the_folder_and_not_after(originals, tmp_path, capsys):
    """The lock is the kernel's: held by another process, the run is refused; once that process
    has died (killed, so it released nothing itself), its lock file is not a lock."""
    out = str(tmp_path / "out")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from diffiner.audio.folders import output_lock\n"
                               f"with output_lock({out!r}, 'diffiner-enhance'):\n"
                               "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert resample_audio.main([originals, out, "--no-progress"]) == 2
        assert f"in use by diffiner-enhance (pid {holder.pid} " in one_error_line(capsys.readouterr().err)
        assert output_digest(out) == {}
    finally:
        holder.kill()
        holder.wait(30)
    assert resample_audio.main([originals, out, "--no-progress"]) == 0
    assert sorted(output_digest(out)) == ["a.wav", os.path.join("sub", "b.wav")]


# ----- finite outputs -----

def test_noisereduce_on_silence_writes_silence_not_full_scale_dc(tmp_path, capsys):
    pytest.importorskip("noisereduce")
    write_wav(str(tmp_path / "in" / "zero.wav"), np.zeros(16000, np.float32), 16000)
    write_wav(str(tmp_path / "in" / "half.wav"), np.stack([np.zeros(8000, np.float32), speech_like(0.5)]), 16000)
    out = tmp_path / "out"
    assert enhance.main([str(tmp_path / "in"), str(out), "--enhancer", "noisereduce", "--no-progress"]) == 0
    assert "2 written" in capsys.readouterr().out
    assert not sf.read(str(out / "zero.wav"), dtype="int16")[0].any()
    half = sf.read(str(out / "half.wav"), dtype="int16")[0]
    assert not half[:, 0].any() and np.abs(half[:, 1]).max() > 1000


@pytest.mark.parametrize("bomb", ["model: &m {self: *m}", "l0: &l0 {x: 1, y: 1}\n" + "\n".join(
    f"l{k}: &l{k} {{" + ", ".join(f"k{j}: *l{k - 1}" for j in range(10)) + "}" for k in range(1, 10))],
                         ids=["recursive-alias", "billion-laughs"])
def test_a_hostile_config_in_the_output_folder_is_one_line_at_once(tmp_path, tiny_checkpoint, capsys, bomb):
    """A config.yml with the refiner's keys and an alias bomb, planted in the output folder: the
    run used to grow without end (a billion keys compared) or end in RecursionError."""
    for side in ("noisy", "proc"):
        write_wav(str(tmp_path / side / "a.wav"), speech_like(0.3, 16000), 16000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yml").write_text(f"diffiner_version: 0.1.0\nrefiner: {{method: diffiner+}}\n{bomb}\n")
    with deadline(60):
        code = refine.main(refine_args(str(tmp_path / "noisy"), str(tmp_path / "proc"), tiny_checkpoint,
                                       "--output-dir", str(out)))
    assert code == 2
    assert "config.yml" in one_error_line(capsys.readouterr().err)
