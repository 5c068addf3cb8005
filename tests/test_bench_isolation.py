"""bench/refine_throughput.py: configurations do not affect each other, compiled ones are compared
with fp32, and the benchmark runs where torch has no FLOP counter (torch 1.11).

The benchmark runs in this process on the small stand-in model, one short file and two steps.
torch.compile is replaced by the identity: what is checked is the benchmark's bookkeeping
(widths, comparisons), not the compiler.
"""

import argparse
import importlib
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import refine_throughput  # noqa: E402  (bench/ is not a package)

from diffiner.script_util import create_model_and_diffusion  # noqa: E402

pytestmark = pytest.mark.slow  # each test refines for several seconds


def run_benchmark(module, monkeypatch, configs: str):
    """main() with the given configurations; the rows of its table by configuration name."""
    tables = []
    monkeypatch.setattr(module, "record", lambda title, table, notes="", save=True: tables.append(table))
    monkeypatch.setattr(torch, "compile", lambda model, **options: model, raising=False)
    monkeypatch.setattr(sys, "argv", ["refine_throughput.py", "--num-files", "1", "--steps", "2", "--small",
                                      "--device", "cpu", "--peak-tflops", "1", "--configs", configs, "--no-record"])
    module.main()
    header, _, *rows = tables[0].splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    return {cells[0]: dict(zip(columns, cells)) for cells in
            ([c.strip() for c in row.strip("|").split("|")] for row in rows)}


def test_a_configuration_never_changes_the_model_the_next_one_gets():
    """Channels-last converts the weights it is given in place; the benchmark hands each
    configuration a copy, so the model every later configuration starts from is untouched."""
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(timestep_respacing="ddim2", **refine_throughput.SMALL_MODEL)
    refine_throughput.without_zero_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recording = (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32)
    args = argparse.Namespace(batch_size=8, max_batch_frames=None, device="cpu")
    name = "bf16+channels-last"
    refine_throughput.run_config(name, refine_throughput.CONFIGS[name], model, diffusion, [recording], args, {})
    convolutions = [p for p in model.parameters() if p.dim() == 4]
    assert convolutions and all(p.is_contiguous() for p in convolutions), "the model was left channels-last"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_compiled_configurations_run_at_fp32s_widths_and_are_compared_with_it(monkeypatch):
    rows = run_benchmark(refine_throughput, monkeypatch, "fp32,bf16,bf16+compile,bf16+cuda-graphs")
    for name in ("bf16+compile", "bf16+cuda-graphs"):
        assert rows[name]["frames per audio frame"] == rows["fp32"]["frames per audio frame"]
        # A number, not "n/a (other widths)"; with compilation replaced by the identity the
        # arithmetic is bf16's, and so is the difference.
        assert rows[name]["difference from fp32"] == rows["bf16"]["difference from fp32"] != "0.0e+00"


def test_the_benchmark_runs_without_a_flop_counter(monkeypatch):
    """torch < 2.1 has no torch.utils.flop_counter: the throughput is still measured, and the
    FLOP-based columns say n/a."""
    monkeypatch.setitem(sys.modules, "torch.utils.flop_counter", None)  # importing it now fails
    monkeypatch.delitem(sys.modules, "refine_throughput")
    without_counter = importlib.import_module("refine_throughput")
    rows = run_benchmark(without_counter, monkeypatch, "fp32")
    assert rows["fp32"]["TFLOP/s"] == "n/a" and rows["fp32"]["of peak"] == "n/a"
    assert float(rows["fp32"]["audio s/s"]) > 0
