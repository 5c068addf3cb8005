"""This project against the authors' `run_refiner.py`, side by side in one run, on the CPU.

Both refine the same files with the same checkpoint and the same reverse steps, one after the
other, each as its own command; the wall time of each command is measured, start to exit. The
authors' code is a checkout of https://github.com/sony/diffiner (`--authors`). It runs as
published, with two stand-ins for packages it imports for file access only (this machine has
neither): `blobfile.BlobFile` (reads the checkpoint) is `open`, and `torchaudio.save` (writes the
outputs) is soundfile's 16-bit PCM writer; its data loader reads with soundfile already.

Default inputs are the demo's: the noisy set of `run_example.sh --demo` made from
demo/audio/clean, its noisereduce outputs, the demo model and its ddim50. This project runs at its
default settings (on a CPU with native bf16: bf16 autocast in channels-last).

    python bench/authors_side_by_side.py --authors /path/to/sony-diffiner      # appends to BENCHMARKS.md
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List

from common import markdown_table, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffiner.audio.enhancers import enhance_folder  # noqa: E402
from diffiner.audio.mixing import make_noisy_set  # noqa: E402
from diffiner.checkpoints import resolve_model_settings  # noqa: E402

DEMO_MODEL = os.path.join(ROOT, "demo", "model", "diffiner_demo.pt")
DEMO_CLEAN = os.path.join(ROOT, "demo", "audio", "clean")
# The model and diffusion settings the authors' parser takes (guided-diffusion's defaults dict).
AUTHORS_MODEL_FLAGS = ("image_size", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample",
                       "num_head_channels", "attention_resolutions", "channel_mult", "dropout", "class_cond",
                       "use_checkpoint", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
                       "learn_sigma", "diffusion_steps", "noise_schedule", "use_kl", "predict_xstart",
                       "rescale_timesteps", "rescale_learned_sigmas")
STAND_INS = {
    "blobfile.py": "BlobFile = open\n",
    "torchaudio/__init__.py": (
        "import soundfile\n"
        "from . import transforms  # noqa: F401\n\n\n"
        "def save(path, waveform, sample_rate, encoding=None, bits_per_sample=None):\n"
        "    soundfile.write(path, waveform.numpy().T, int(sample_rate), subtype='PCM_16')\n"),
    "torchaudio/transforms.py": "",
}


def write_stand_ins(folder: str) -> None:
    for name, text in STAND_INS.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def timed(command: List[str], env: dict) -> float:
    """Wall seconds of `command`, which must succeed."""
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", required=True, help="a checkout of github.com/sony/diffiner")
    parser.add_argument("--model-path", default=DEMO_MODEL)
    parser.add_argument("--root-noisy", help="default: the demo's noisy set, made in a temporary folder")
    parser.add_argument("--root-proc", help="default: noisereduce's outputs for --root-noisy")
    parser.add_argument("--steps", default="ddim50", help="the reverse steps of both (--timestep-respacing)")
    parser.add_argument("--batch-size", type=int, default=8, help="both programs' --batch-size")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="side_by_side_")
    noisy = args.root_noisy or os.path.join(work, "noisy")
    if args.root_noisy is None:
        make_noisy_set(DEMO_CLEAN, noisy, progress=False)
    proc = args.root_proc
    if proc is None:
        proc = os.path.join(work, "noisereduce")
        enhance_folder("noisereduce", noisy, proc, progress=False)
    files = sorted(f for f in os.listdir(proc) if f.endswith(".wav"))
    settings = resolve_model_settings(args.model_path, {}).values
    stand_ins = os.path.join(work, "stand_ins")
    write_stand_ins(stand_ins)

    # The authors' program writes its outputs into --root-proc: it gets a copy of its own.
    authors_proc = os.path.join(work, "authors")
    shutil.copytree(proc, authors_proc)
    authors_env = dict(os.environ, PYTHONPATH=stand_ins, CUDA_VISIBLE_DEVICES="")
    authors = [sys.executable, os.path.join(args.authors, "scripts", "run_refiner.py"), "--no-gpu",
               "--root-noisy", noisy, "--root-proc", authors_proc, "--model-path", args.model_path,
               "--timestep-respacing", args.steps, "--batch-size", str(args.batch_size)]
    for key in AUTHORS_MODEL_FLAGS:
        if key in settings:
            authors += [f"--{key}", str(settings[key])]
    ours_env = dict(os.environ, PYTHONPATH=ROOT)
    ours = [sys.executable, os.path.join(ROOT, "scripts", "run_refiner.py"), "--device", "cpu", "--no-progress",
            "--root-noisy", noisy, "--root-proc", proc, "--model-path", args.model_path,
            "--timestep-respacing", args.steps, "--batch-size", str(args.batch_size),
            "--output-dir", os.path.join(work, "ours")]
    authors_s = timed(authors, authors_env)
    ours_s = timed(ours, ours_env)
    rows = [["authors' scripts/run_refiner.py (fp32, every file padded to its fixed width)", f"{authors_s:.1f}", "1.0"],
            ["this project, default settings", f"{ours_s:.1f}", f"{authors_s / ours_s:.1f}"]]
    table = markdown_table(["program", "wall s", "speed-up"], rows)
    notes = (f"{len(files)} files, checkpoint {os.path.relpath(args.model_path, ROOT)}, {args.steps}, batch size "
             f"{args.batch_size}, CPU; each program's whole command timed, from start to exit, one after the other. "
             f"Authors' command: `{' '.join(shlex.quote(c) for c in authors)}` (with stand-ins for blobfile and "
             f"torchaudio.save). This project's: `{' '.join(shlex.quote(c) for c in ours)}`.")
    record("Side by side with the authors' run_refiner.py", table, notes, save=not args.no_record)


if __name__ == "__main__":
    main()
