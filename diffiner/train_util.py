"""The training loop: guided-diffusion's TrainLoop, with an exact resume, its fp16 fix, and a stop
that never loses the steps done.

One training step consumes one batch per rank: a timestep and a noise tensor are drawn for
every example from a generator seeded by (seed, the example's global position), the loss is
computed in microbatches, the gradients are averaged over ranks (DistributedDataParallel),
then AdamW steps and every EMA follows. Since nothing random depends on the rank or on
process-global generators, W ranks with batch B compute what one process with batch W*B
computes, and a resumed run continues exactly as an uninterrupted one.

Checkpoints, in the log folder, NNNNNN being the number of training steps done, written as one
set whose files appear together (see diffiner/checkpoints.py):
- `modelNNNNNN.pt`: the model's state dict;
- `ema_<rate>_NNNNNN.pt`: the state dict of each EMA (what a user refines with);
- `optNNNNNN.pt`: the optimizer state and everything else needed to resume exactly.

Stopping early: SIGINT (Ctrl-C), SIGTERM (what a cluster scheduler sends before pre-emption),
SIGHUP (a closed terminal) and a training file that cannot be read end the run at the next step
boundary, after saving the set of the steps done. The ranks of a distributed job agree on it at every boundary, so they
all stop at the same step and take part in the save even when only one of them was signalled.

Divergence: a step whose loss or gradients are NaN or infinite changes nothing (see `TrainLoop.optimize`).
`NONFINITE_STEPS_LIMIT` such steps in a row end the run (`TrainingDiverged`, exit status 1), after
saving the state they left, which is that of the last step that updated the weights. No set holding
a non-finite tensor is ever written: such a state ends the run too, and the newest set on disk stays
the one to resume from.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import dist_util
from .acceleration import NetworkRunner, autocast_dtype
from .audio.io import AudioError
from .errors import DiffinerError
from .checkpoints import (checkpoint_step, ema_filename, load_state_dict, load_weights, missing_set_files,
                          model_filename, opt_filename, prune_checkpoint_sets, remove_interrupted_saves,
                          save_checkpoint_set)
from .logger import MetricsLogger
from .schedule_sampler import LossAwareSampler, ScheduleSampler, UniformSampler
from .seeding import STREAM_DIFFUSION, randn, stream_generator

logger = logging.getLogger(__name__)

INITIAL_LG_LOSS_SCALE = 20.0
# Consecutive steps with a non-finite loss (or, outside fp16, non-finite gradients) that end the
# run. A stray overflow, or one bad batch, spoils a step or two, which are skipped; a run that
# has diverged (weights blown up by too high a learning rate) spoils every step from then on,
# and would otherwise loop for ever. Ten is well above the first and costs ten skipped steps of
# the second. fp16's gradient overflows do not count: the loss scaler cures them by halving the
# scale, which may take more than ten steps from the initial 2**20.
NONFINITE_STEPS_LIMIT = 10


class DynamicLossScaler:
    """guided-diffusion's dynamic loss scaling for float16 training.

    The loss is multiplied by 2**lg_loss_scale before the backward pass so that small float16
    gradients do not flush to zero. A step whose gradients contain inf/nan is skipped and the
    scale halves (lg_loss_scale -= 1); every good step raises lg_loss_scale by `growth`.
    """

    def __init__(self, lg_loss_scale: float = INITIAL_LG_LOSS_SCALE, growth: float = 1e-3):
        self.lg_loss_scale = lg_loss_scale
        self.growth = growth

    @property
    def scale(self) -> float:
        return 2.0 ** self.lg_loss_scale

    def unscale_(self, grads: Sequence[torch.Tensor]) -> None:
        """Divide EVERY gradient by the scale.

        The vendored trainer of the original Diffiner unscaled only the first parameter's
        gradient (docs/method.md, "What we fixed"), so all other layers stepped with gradients 2**20 too big.
        """
        if grads:
            torch._foreach_mul_(list(grads), 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        self.lg_loss_scale += self.growth if finite else -1.0

    def state_dict(self) -> Dict[str, float]:
        return {"lg_loss_scale": self.lg_loss_scale, "growth": self.growth}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.lg_loss_scale = float(state["lg_loss_scale"])


def parse_ema_rates(ema_rate) -> List[float]:
    """"0.9999" or "0.999,0.9999" (or a float) -> list of rates in (0, 1)."""
    rates = [float(r) for r in str(ema_rate).split(",") if r.strip()]
    if not rates or any(not 0.0 < r < 1.0 for r in rates):
        raise ValueError(f"ema_rate must be a comma-separated list of numbers in (0, 1), got {ema_rate!r}")
    return rates


def resume_hint(checkpoint: str) -> str:
    """How to continue from `checkpoint` (a modelNNNNNN.pt): the words every stop message ends with."""
    return f"resume with --resume_checkpoint {os.path.dirname(checkpoint)}"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a step boundary on SIGINT or SIGTERM, after saving that step's set.

    A KeyboardInterrupt, so that code which does not know it treats it as Ctrl-C.

    :param signum: the signal (the highest one any rank received).
    :param step: the training steps done.
    :param checkpoint: the model file of the newest checkpoint set (of `step`), or None when
        nothing had been trained or saved yet.
    """

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class TrainingDiverged(DiffinerError):
    """Training stopped because its loss, gradients or weights became NaN or infinite; the message
    says where the last good set is. Exit status 1: the run failed."""


class StopSignals:
    """While entered: SIGINT, SIGTERM and SIGHUP set `received` instead of ending the process, so
    that training can stop at the next step boundary with its checkpoint saved.

    A second signal means "now": the original handlers come back and the signal is raised
    again (Ctrl-C twice: KeyboardInterrupt at once, without saving). A signal the process
    inherited as ignored stays ignored: a shell starts background jobs (`&`) with SIGINT ignored
    and `nohup` ignores SIGHUP, so that those signals are not meant for the job. Outside the
    main thread, where Python cannot set handlers, nothing is changed.
    """

    # SIGHUP: the terminal or SSH session that started the run was closed.
    SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning("%s received: stopping after the step in progress and saving a checkpoint "
                       "(send it again to stop at once without saving)", signal.Signals(signum).name)


def norm_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors together, in float32, as a 0-dim tensor on their device (read by
    nobody yet: no host synchronisation). One multi-tensor kernel for the per-tensor norms."""
    if not tensors:
        return torch.zeros((), device=dist_util.dev())
    return torch.norm(torch.stack(torch._foreach_norm([t.detach().float() for t in tensors])))


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    """L2 norm of all tensors together, in float32, read on the host."""
    return float(norm_tensor(tensors))


def rng_state() -> Dict:
    """This process's global random states (dropout uses torch's), in torch.load-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and dist_util.dev().type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist_util.dev())
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and dist_util.dev().type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dist_util.dev())


class TrainLoop:
    """Trains `model` on batches of spectrograms; see the module docstring.

    :param batch_size: examples per rank per step (the global batch is batch_size × ranks).
    :param microbatch: examples per forward/backward pass (-1: the whole batch); gradients
        are accumulated so that the step is the same whatever the microbatch size.
    :param ema_rate: "0.9999" or a comma list; one EMA of the parameters per rate.
    :param precision: "fp32", "bf16" (bfloat16 autocast) or "fp16" (float16 autocast with dynamic
        loss scaling).
    :param lr_anneal_steps: when > 0, the learning rate falls linearly to 0 at this step, where
        training stops.
    :param grad_clip: clip the global gradient norm to this (0: no clipping).
    :param max_steps: stop when this many steps are done, resumed ones included (0: never).
    :param resume_checkpoint: a modelNNNNNN.pt whose set (EMA and optimizer files beside it) to
        continue from. An incomplete set is refused (ValueError) unless `allow_fresh_optimizer`,
        which starts the missing optimizer state and EMAs afresh.
    :param seed: the seed of the example stream (per-example timesteps and noise).
    :param nonfinite_steps_limit: consecutive steps with a non-finite loss (or, outside fp16,
        non-finite gradients) that end the run with TrainingDiverged.
    :param keep_last: after each save, keep only the newest this many complete checkpoint sets
        (`checkpoints.prune_checkpoint_sets`); 0 keeps them all.
    :param progress: show a progress bar (rank 0) with the step, the loss and samples/s of the
        last log interval, and the time left to the stop step.
    :param metric_tables: print each log interval's metrics as a table on stdout (they go to
        progress.csv, progress.jsonl and TensorBoard either way).
    """

    def __init__(
        self, *, model: torch.nn.Module, diffusion, batch_size: int, lr: float, log_dir: str,
        microbatch: int = -1, ema_rate="0.9999", log_interval: int = 10, save_interval: int = 10000,
        resume_checkpoint: str = "", allow_fresh_optimizer: bool = False, precision: str = "fp32",
        fp16_scale_growth: float = 1e-3,
        initial_lg_loss_scale: float = INITIAL_LG_LOSS_SCALE, schedule_sampler: Optional[ScheduleSampler] = None,
        weight_decay: float = 0.0, lr_anneal_steps: int = 0, grad_clip: float = 0.0, max_steps: int = 0,
        seed: int = 0, metrics: Optional[MetricsLogger] = None, channels_last: bool = False,
        nonfinite_steps_limit: int = NONFINITE_STEPS_LIMIT, keep_last: int = 0, progress: bool = True,
        metric_tables: bool = True,
    ):
        autocast_dtype(precision)  # refuses an unknown precision before any work
        self.model = model.to(dist_util.dev())
        self.diffusion = diffusion
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.global_batch = batch_size * dist_util.get_world_size()
        self.lr = lr
        self.ema_rates = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.log_dir = log_dir
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.lr_anneal_steps = lr_anneal_steps
        self.grad_clip = grad_clip
        self.max_steps = max_steps
        self.nonfinite_steps_limit = nonfinite_steps_limit
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.keep_last = keep_last
        self.progress = progress
        self._bar: Optional[tqdm] = None  # while run_loop runs
        # Of the last forward_backward: a 0-dim device tensor until `optimize` reads it, then a bool.
        self._loss_finite: Union[bool, torch.Tensor] = True
        # (timesteps, weighted loss terms) of each microbatch since the last dump, on the device:
        # they reach the host in `dump_metrics`, not at every step.
        self._pending_losses: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = []
        self._spoiled = False  # whether the last step counts toward nonfinite_steps_limit
        self.seed = seed
        self.precision = precision
        self.scaler = DynamicLossScaler(initial_lg_loss_scale, fp16_scale_growth) if precision == "fp16" else None

        self.step = 0  # training steps done, resumed ones included
        self.data_position = 0  # examples consumed by the whole job
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.ema_params: List[List[torch.Tensor]] = []
        self.last_checkpoint: Optional[str] = None  # the model file of the newest complete set
        if resume_checkpoint:
            self._resume(resume_checkpoint, allow_fresh_optimizer)
        else:
            self.ema_params = [self._copy_params() for _ in self.ema_rates]
        if dist_util.is_main():
            remove_interrupted_saves(log_dir)
        dist_util.sync_params(self.model.parameters())
        for ema in self.ema_params:
            dist_util.sync_params(ema)

        if dist_util.is_distributed():
            device = dist_util.dev()
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False, bucket_cap_mb=128, find_unused_parameters=False,
            )
        else:
            self.ddp_model = self.model
        self.network = NetworkRunner(self.ddp_model, self.precision, channels_last)
        columns = ["step", "samples", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm",
                   "param_norm", "samples_per_sec", "lr"] + (["lg_loss_scale"] if self.scaler else [])
        if metrics is None:
            # A fresh start is step 0 too: rows an earlier attempt logged in this folder (one killed
            # before its first checkpoint, then rerun with --resume_checkpoint auto) are dropped
            # rather than followed by a second row of each step.
            metrics = MetricsLogger(log_dir, columns=columns, resume_step=self.step, table=metric_tables)
        self.metrics = metrics
        self._interval_start = (time.time(), self.data_position)

    # ----- the loop -----
    @property
    def stop_step(self) -> Optional[int]:
        """The step at which training ends, or None to train until interrupted."""
        limits = [n for n in (self.max_steps, self.lr_anneal_steps) if n > 0]
        return min(limits) if limits else None

    def run_loop(self, data: Iterator[Dict[str, torch.Tensor]]) -> None:
        """Train on `data` (this rank's batches) until the stop step; save at the end.

        Stops early, at a step boundary and after saving the set of the steps done, on SIGINT
        or SIGTERM (raises TrainingInterrupted) and when a batch cannot be read (raises
        AudioError naming the file). Raises TrainingDiverged after `nonfinite_steps_limit`
        spoiled steps in a row (having saved the state they left, when it is finite) and as soon
        as a save finds a non-finite tensor (writing nothing). Every rank must call it.
        """
        stop = self.stop_step
        if stop is not None and self.step >= stop:
            logger.info("step %d already reaches the stop step %d: nothing to train", self.step, stop)
            return
        last_saved = self.step
        spoiled_run = 0  # consecutive spoiled steps, as all ranks agreed on them
        with StopSignals() as signals, self._progress_bar(stop) as bar:
            while stop is None or self.step < stop:
                batch, data_error = self._next_batch(data)
                signum, data_errors, spoiled = self._agree_to_stop(signals.received, data_error, self._spoiled)
                spoiled_run = spoiled_run + 1 if spoiled else 0
                if signum or data_errors or spoiled_run >= self.nonfinite_steps_limit:
                    saved = self._finish(last_saved)
                    # No rank leaves before rank 0 has written the set: a launcher ends the
                    # other ranks as soon as one exits.
                    dist_util.barrier()
                    if spoiled_run >= self.nonfinite_steps_limit or not saved:
                        raise self._diverged(spoiled_run, saved)
                    if data_errors:
                        raise AudioError(f"{data_errors[0]} (training stopped at step {self.step}; "
                                         f"{self._where_saved()})")
                    raise TrainingInterrupted(signum, self.step, self.last_checkpoint)
                self.run_step(batch)
                bar.update(1)
                if self.step % self.log_interval == 0:
                    self.dump_metrics()
                if self.step % self.save_interval == 0:
                    if not self.save():
                        raise self._diverged(spoiled_run, saved=False)
                    last_saved = self.step
        if not self._finish(last_saved):
            raise self._diverged(spoiled_run, saved=False)

    @contextlib.contextmanager
    def _progress_bar(self, stop: Optional[int]) -> Iterator[tqdm]:
        """The bar of `run_loop` (rank 0, when `progress`): steps done of `stop`, hence the time
        left, and the loss and samples/s of the last log interval. While it shows, the package's
        log lines and the metric tables are written above it (tqdm.write), never into its line."""
        shown = self.progress and dist_util.is_main()
        # The loggers whose terminal handlers print the package's lines: the package's own, and
        # the root logger's (setup_logging's). Only those are redirected, or lines would print twice.
        consoles = [lg for lg in (logging.getLogger("diffiner"), logging.getLogger()) if any(
            isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in lg.handlers)]
        with tqdm(total=stop, initial=self.step, desc="training", unit="step", disable=not shown,
                  dynamic_ncols=True) as bar, \
                (logging_redirect_tqdm(consoles) if shown and consoles else contextlib.nullcontext()):
            self._bar = bar
            try:
                yield bar
            finally:
                self._bar = None

    def _finish(self, last_saved: int) -> bool:
        """Log and save the steps done since the last dump and the last save (`last_saved`);
        False when the state was not saved because it holds a non-finite tensor."""
        # Steps since the last dump, not `step % log_interval`: a run stopped right after resuming
        # has trained nothing, and a second row of the resumed step would have no step in it.
        if self.data_position != self._interval_start[1]:
            self.dump_metrics()
        return self.step == last_saved or self.save()

    def _diverged(self, spoiled_run: int, saved: bool) -> TrainingDiverged:
        """The error that ends a diverged run, after `_finish`: `spoiled_run` steps in a row were
        spoiled (at the limit, or fewer when the weights themselves turned non-finite); `saved`:
        whether the state at the stop was finite, hence saved."""
        if spoiled_run >= self.nonfinite_steps_limit:
            cause = (f"the loss or gradients were NaN or infinite for {spoiled_run} consecutive steps "
                     f"(steps {self.step - spoiled_run + 1}-{self.step}, all skipped)")
        else:
            cause = "the weights, EMA or optimizer state became NaN or infinite"
        if saved and self.last_checkpoint is not None:
            where = f"the state of the last step that updated the weights is saved: {resume_hint(self.last_checkpoint)}"
        elif self.last_checkpoint is not None:
            where = (f"that state was not saved; the newest good set is {self.last_checkpoint}: "
                     f"{resume_hint(self.last_checkpoint)}")
        else:
            where = "nothing was saved"
        return TrainingDiverged(f"training diverged at step {self.step}: {cause} (lower --lr, or clip with "
                                f"--grad_clip); {where}")

    @staticmethod
    def _next_batch(data: Iterator[Dict[str, torch.Tensor]]) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
        """(batch, "") or, when a training file cannot be read, (None, the error naming it)."""
        try:
            return next(data), ""
        except AudioError as exc:
            return None, str(exc)

    def _agree_to_stop(self, signum: Optional[int], data_error: str, spoiled: bool) -> Tuple[int, List[str], bool]:
        """What every rank must do at this step boundary: (the highest signal any rank received,
        0 if none; the data errors of all ranks; whether the step just done was spoiled on any
        rank). A collective in a distributed job, so that all ranks stop at the same step and save
        together even if only one was signalled, or saw a non-finite loss in its share of the batch."""
        if not dist_util.is_distributed():
            return signum or 0, [data_error] if data_error else [], spoiled
        flags = torch.tensor([signum or 0, int(bool(data_error)), int(spoiled)], dtype=torch.int64,
                             device=dist_util.dev())
        highest_signal, any_error, any_spoiled = dist_util.all_reduce_max(flags).tolist()
        errors = [e for e in dist_util.all_gather_objects(data_error) if e] if any_error else []
        return highest_signal, errors, bool(any_spoiled)

    def _where_saved(self) -> str:
        if self.last_checkpoint is None:
            return "no step was done, nothing was saved"
        return f"its checkpoint set is saved: {resume_hint(self.last_checkpoint)}"

    def run_step(self, batch: Dict[str, torch.Tensor]) -> bool:
        """One training step on this rank's batch; returns whether the optimizer stepped."""
        self.forward_backward(batch)
        took_step = self.optimize()
        if took_step:
            self._update_ema()
        # What counts toward NONFINITE_STEPS_LIMIT: a non-finite loss in any precision; a skipped
        # step (non-finite gradients) too, except in fp16, where the loss scaler deals with those.
        self._spoiled = not self._loss_finite or (not took_step and self.scaler is None)
        self.step += 1
        self.data_position += self.global_batch
        self.metrics.log("step", self.step)
        self.metrics.log("samples", self.data_position)
        return took_step

    def forward_backward(self, batch: Dict[str, torch.Tensor]) -> None:
        """Accumulate the gradient of the batch's mean (importance-weighted) loss."""
        self.opt.zero_grad(set_to_none=True)
        x_start = batch["spec"].to(dist_util.dev(), non_blocking=True)
        # The positions come from the data loader, on the host: reading them costs no sync.
        generators = [stream_generator(self.seed, STREAM_DIFFUSION, p) for p in batch["position"].tolist()]
        # Order of draws from each example's generator: timestep, then noise (the batch's noise
        # reaches the device in one copy: seeding.randn).
        t, weights = self.schedule_sampler.sample(len(generators), dist_util.dev(), generators)
        noise = randn(x_start.shape, dist_util.dev(), generators)
        count = x_start.shape[0]
        finite = []
        for lo in range(0, count, self.microbatch):
            hi = min(lo + self.microbatch, count)
            last = hi == count
            sync = contextlib.nullcontext() if last or self.ddp_model is self.model else self.ddp_model.no_sync()
            with sync:
                losses = self.diffusion.training_losses(self.network, x_start[lo:hi], t[lo:hi], noise=noise[lo:hi])
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(t[lo:hi], losses["loss"].detach())
                # Weighted by the microbatch's share, so microbatching does not change the step.
                loss = (losses["loss"] * weights[lo:hi]).mean() * ((hi - lo) / count)
                finite.append(torch.isfinite(loss.detach()))
                self._pending_losses.append((t[lo:hi], {k: (v * weights[lo:hi]).detach() for k, v in losses.items()}))
                (loss * self.scaler.scale if self.scaler else loss).backward()
        self._loss_finite = torch.stack(finite).all()

    def optimize(self) -> bool:
        """Unscale, check, clip and apply the gradients; False when the step was skipped: the
        gradients, or the loss of `forward_backward`, are NaN or infinite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        # The step's one read on the host, of two numbers together: whether to step at all must
        # be decided there, since a skipped step leaves AdamW's state untouched (as PyTorch's
        # GradScaler, which reads its inf flag at every step). The losses stay on the device.
        loss_finite, norm = torch.stack([torch.as_tensor(self._loss_finite, dtype=torch.float64, device=dist_util.dev()),
                                         norm_tensor(grads).double()]).tolist()
        self._loss_finite = bool(loss_finite)
        # A non-finite loss whose gradients happen to be finite (its NaN in a term that has no
        # gradient) is no sounder a step.
        finite = math.isfinite(norm) and self._loss_finite
        if self.scaler:
            if finite:
                self.scaler.unscale_(grads)
                norm /= self.scaler.scale
            self.scaler.update(finite)
            self.metrics.log("lg_loss_scale", self.scaler.lg_loss_scale)
        if not finite:
            if not self.scaler or not self._loss_finite:
                logger.warning("step %d: non-finite %s; step skipped", self.step + 1,
                               "gradients" if self._loss_finite else "loss")
            return False
        if self.grad_clip > 0 and norm > self.grad_clip:
            torch._foreach_mul_(grads, self.grad_clip / (norm + 1e-6))
        self.metrics.log_mean("grad_norm", norm)
        lr = self.current_lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.metrics.log("lr", lr)
        self.opt.step()
        return True

    def current_lr(self) -> float:
        """Linear annealing to 0 at lr_anneal_steps (constant when 0)."""
        if not self.lr_anneal_steps:
            return self.lr
        return self.lr * (1.0 - self.step / self.lr_anneal_steps)

    def _update_ema(self) -> None:
        # Multi-tensor kernels (a few launches for all parameters, not two per parameter); the
        # same arithmetic as target.mul_(rate).add_(source, alpha=1 - rate).
        with torch.no_grad():
            for rate, ema in zip(self.ema_rates, self.ema_params):
                torch._foreach_mul_(ema, rate)
                torch._foreach_add_(ema, self.params, alpha=1.0 - rate)

    def _log_losses(self) -> None:
        """Mean of each loss term since the last dump, overall and per quarter of the timestep
        range, logged microbatch by microbatch as they were computed; one transfer to the host."""
        pending, self._pending_losses = self._pending_losses, []
        if not pending:
            return
        timesteps = torch.cat([t for t, _ in pending]).cpu().numpy()
        stacked = torch.stack([torch.cat([terms[key].float() for _, terms in pending]) for key in pending[0][1]])
        values_of = dict(zip(pending[0][1], stacked.cpu().numpy()))
        lo = 0
        for t, terms in pending:
            hi = lo + len(t)
            quartiles = (4 * timesteps[lo:hi] // self.diffusion.num_timesteps).tolist()
            for key in terms:
                values = values_of[key][lo:hi]
                self.metrics.log_mean(key, float(values.mean()), len(values))
                for quartile, value in zip(quartiles, values.tolist()):
                    self.metrics.log_mean(f"{key}_q{quartile}", value)
            lo = hi

    def dump_metrics(self) -> None:
        start_time, start_position = self._interval_start
        now = time.time()
        self._log_losses()
        self.metrics.log("param_norm", global_norm(self.params))
        self.metrics.log("samples_per_sec", (self.data_position - start_position) / max(now - start_time, 1e-9))
        values = self.metrics.dump(self.step)
        self._interval_start = (now, self.data_position)
        if self._bar is not None and "loss" in values:
            self._bar.set_postfix(loss=f"{values['loss']:.4g}", samples_per_s=f"{values['samples_per_sec']:.3g}",
                                  refresh=False)

    # ----- checkpoints -----
    def _copy_params(self) -> List[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def _ema_state_dict(self, ema: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        values = {name: tensor for (name, _), tensor in zip(self.model.named_parameters(), ema)}
        return {name: values.get(name, tensor).detach().cpu() for name, tensor in self.model.state_dict().items()}

    def _training_state(self) -> Dict:
        return {
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "data_position": self.data_position,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "loss_scaler": self.scaler.state_dict() if self.scaler else None,
            "schedule_sampler": self.schedule_sampler.state_dict(),
            "rng": dist_util.all_gather_objects(rng_state()),  # one entry per rank
        }

    def save(self) -> bool:
        """Write the checkpoint set of the current step (rank 0; all ranks call it); False, and
        nothing written, when a tensor of the set (weights, EMA, optimizer state) is NaN or
        infinite: resuming from it could only go on producing NaN."""
        if not self._state_is_finite():
            logger.warning("step %d: the weights, EMA or optimizer state hold NaN or infinite values: checkpoint "
                           "set not written", self.step)
            return False
        state = self._training_state()  # a collective: every rank takes part
        if dist_util.is_main():
            self.last_checkpoint = save_checkpoint_set(
                self.log_dir, self.step, {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                {rate: self._ema_state_dict(ema) for rate, ema in zip(self.ema_rates, self.ema_params)}, state)
            logger.info("saved the checkpoint set of step %d in %s", self.step, self.log_dir)
            if self.keep_last:
                removed = prune_checkpoint_sets(self.log_dir, self.keep_last, self.step, self.ema_rates)
                if removed:
                    logger.info("--keep_last %d: removed the checkpoint set(s) of step(s) %s", self.keep_last,
                                ", ".join(map(str, removed)))
        else:
            self.last_checkpoint = os.path.join(self.log_dir, model_filename(self.step))
        return True

    def _state_is_finite(self) -> bool:
        """Whether every tensor of the set to save is finite, on every rank (a collective: the
        ranks hold the same values, but they must not decide apart)."""
        tensors = list(self.model.state_dict().values()) + [t for ema in self.ema_params for t in ema]
        tensors += [v for state in self.opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
        flag = torch.tensor([int(not finite)], dtype=torch.int64, device=dist_util.dev())
        return not dist_util.all_reduce_max(flag).item()

    def _resume(self, path: str, allow_fresh_optimizer: bool) -> None:
        """Load the model, EMA and training state of `path` (a modelNNNNNN.pt) and its set.

        Every file is checked to be there before any is read; an incomplete set is refused
        unless `allow_fresh_optimizer`.
        """
        step = checkpoint_step(path)
        folder = os.path.dirname(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such checkpoint")
        missing = missing_set_files(folder, step, self.ema_rates)
        if missing and not allow_fresh_optimizer:
            raise ValueError(
                f"{path}: its checkpoint set is incomplete ({', '.join(missing)} missing beside it); resuming "
                f"would not continue the interrupted run. Resume from a complete set (give the folder to take "
                f"its newest complete one) or accept fresh optimizer/EMA states with --allow-fresh-optimizer")
        load_weights(self.model, path)
        self.step = step
        logger.info("resuming from %s at step %d", path, self.step)
        for rate in self.ema_rates:
            ema_path = os.path.join(folder, ema_filename(rate, self.step))
            if ema_filename(rate, self.step) not in missing:
                ema_model = copy.deepcopy(self.model)
                load_weights(ema_model, ema_path)
                self.ema_params.append([p.detach() for p in ema_model.parameters()])
            else:
                logger.warning("%s not found: the EMA with rate %s starts from the model", ema_path, rate)
                self.ema_params.append(self._copy_params())
        opt_path = os.path.join(folder, opt_filename(self.step))
        if opt_filename(self.step) in missing:
            logger.warning("%s not found: fresh optimizer state; the data stream continues at step %d",
                           opt_path, self.step)
            self.data_position = self.step * self.global_batch
            return
        state = load_state_dict(opt_path)
        missing_keys = [k for k in ("optimizer", "data_position", "seed", "schedule_sampler", "rng") if k not in state]
        if missing_keys:
            raise ValueError(f"{opt_path}: not a training state written by diffiner-train "
                             f"(no {', '.join(missing_keys)})")
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{opt_path}: the optimizer state does not fit the model ({exc})") from exc
        self.data_position = int(state["data_position"])
        if self.scaler and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])
        try:
            self.schedule_sampler.load_state_dict(state["schedule_sampler"])
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{opt_path}: its timestep-sampler state does not fit --schedule_sampler / "
                             f"--diffusion_steps (missing or wrong entry: {exc})") from exc
        if int(state["seed"]) != self.seed:
            logger.warning("resuming with seed %d, the checkpoint used %d: the example stream changes",
                           self.seed, state["seed"])
        rng = state["rng"]
        if len(rng) == dist_util.get_world_size():
            set_rng_state(rng[dist_util.get_rank()])
        else:
            logger.warning("checkpoint written by %d rank(s), now %d: random states not restored",
                           len(rng), dist_util.get_world_size())
        if not missing:
            self.last_checkpoint = path
