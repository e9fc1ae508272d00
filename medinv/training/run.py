"""Book-keeping shared by the training loops: resume, checkpoints, metrics, time budget."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .checkpoint import read_checkpoint, save_checkpoint

_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ProgressLR(torch.optim.lr_scheduler.LRScheduler):
    """A learning rate that follows how far the run is, not how many epochs it has run.

    ``progress()`` says how far the run is (0 to 1) when the scheduler steps, at the end of
    an epoch (:meth:`TrainingRun.progress`). In a time-budgeted run the schedule then spans
    the budget whatever the device's speed, where one over a fixed number of epochs ends
    late or never on a slower device. Subclasses give the rate's factor at a share.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, progress: Callable[[], float]):
        self.progress = progress
        super().__init__(optimizer)

    def factor(self, share: float) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0:  # the scheduler's construction, before any epoch
            return list(self.base_lrs)
        factor = self.factor(min(self.progress(), 1.0))
        return [lr * factor for lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "progress"}


class ProgressStepLR(ProgressLR):
    """The learning rate times ``gamma`` each time another ``fraction`` of the run is done."""

    def __init__(self, optimizer, fraction: float, gamma: float, progress):
        self.fraction, self.gamma = fraction, gamma
        super().__init__(optimizer, progress)

    def factor(self, share: float) -> float:
        return self.gamma ** int(share / self.fraction + 1e-9)


class ProgressCosineLR(ProgressLR):
    """Cosine annealing from the initial learning rate to zero over the run."""

    def factor(self, share: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * share))


class TrainingRun:
    """One run folder: ``last.pt`` (with optimizer and scheduler, for ``resume``),
    ``best.pt`` (best score so far), ``metrics.csv`` (one row per epoch) and TensorBoard logs.

    Args:
        out_dir: the run folder.
        kind, model_config: how :func:`medinv.models.build_model` rebuilds the model.
        config: the validated training config (stored in checkpoints); from its ``train``
            section: ``time_budget_minutes`` (the loops validate and stop after the epoch
            in which this much training time is used, :meth:`budget_used`), ``amp``
            (``"none"``, ``"bf16"`` or ``"fp16"`` with loss scaling, for :meth:`autocast`)
            and ``grad_clip`` (the gradient norm :meth:`step` clips to).
        resume: continue from ``out_dir/last.pt`` where it exists.
        main: write files (in a multi-process job only rank 0 does; the others keep count).
    """

    def __init__(
        self,
        out_dir: Path,
        kind: str,
        model_config: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: Any,
        device: torch.device,
        resume: bool = False,
        main: bool = True,
    ):
        train = config.train
        self.out_dir, self.kind, self.model_config = out_dir, kind, model_config
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config, self.device, self.budget = config, device, train.time_budget_minutes
        self.amp, self.grad_clip = _AMP[train.amp], train.grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.history: list[dict[str, Any]] = []
        self.best, self.start_epoch = -float("inf"), 0
        if resume and (out_dir / "last.pt").is_file():
            state = read_checkpoint(out_dir / "last.pt")
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.start_epoch, self.best = state["epoch"], state["best"]
            self.history = list(state["history"])
        self.main = main
        self.writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self._started, self._lr = 0.0, float("nan")

    def autocast(self) -> torch.autocast:
        """The forward pass's mixed-precision context (off for ``amp="none"``)."""
        dtype = self.amp or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp is not None)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, gradient clipping and optimizer step, with fp16 loss scaling."""
        self.backward(loss)
        self.update()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward (with fp16 loss scaling): the gradients add to those already there."""
        self.scaler.scale(loss).backward()

    def update(self) -> None:
        """Gradient clipping and the optimizer step on the gradients summed so far."""
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def epochs(self, sampler: Any = None) -> Iterator[int]:
        """The epochs still to run (all but those a resumed run has done), each begun:
        the model in training mode, the epoch's clock and CUDA peak reset and, in a
        multi-process job, the distributed ``sampler`` reshuffled."""
        for epoch in range(self.start_epoch, self.config.train.epochs):
            self.model.train()
            self._lr = self.optimizer.param_groups[0]["lr"]
            self._started = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            if sampler is not None:
                sampler.set_epoch(epoch)
            yield epoch

    def batches(
        self,
        loader: Iterable,
        epoch: int,
        progress: Callable[[str, int, int], None] | None,
        per_step: int = 1,
    ) -> Iterator[Any]:
        """The epoch's batches, at most ``train.steps_per_epoch`` optimizer steps of
        ``per_step`` batches each; ``progress`` is told after each batch."""
        steps = self.batch_count(loader, per_step)
        for step, batch in enumerate(loader):
            if step == steps:
                break
            yield batch
            if progress:
                progress(f"epoch {epoch + 1}/{self.config.train.epochs}", step + 1, steps)

    def batch_count(self, loader: Iterable, per_step: int = 1) -> int:
        """How many batches :meth:`batches` yields per epoch."""
        cap = self.config.train.steps_per_epoch
        return min(len(loader), cap * per_step) if cap else len(loader)

    def validation_due(self, epoch: int) -> bool:
        """Every ``train.val_interval`` epochs, and after the last."""
        t = self.config.train
        return (epoch + 1) % t.val_interval == 0 or epoch + 1 == t.epochs

    def epoch_row(self, epoch: int, losses: list[float]) -> dict[str, Any]:
        """The row of a finished training epoch: loss, time, the learning rate it trained
        at and (CUDA) peak memory."""
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": sum(losses) / max(len(losses), 1),
            "train_seconds": time.perf_counter() - self._started,
            "lr": self._lr,
        }
        if self.device.type == "cuda":
            row["peak_memory_GiB"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row

    def progress(self) -> float:
        """How far the run is at the end of the epoch under way: the larger of the share of
        its epochs done and the share of its time budget used (it stops when either is 1)."""
        done = (len(self.history) + 1) / self.config.train.epochs
        if self.budget is None:
            return done
        seconds = sum(r["train_seconds"] for r in self.history)
        seconds += time.perf_counter() - self._started
        return max(done, seconds / 60 / self.budget)

    def budget_used(self, row: dict[str, Any]) -> bool:
        """Whether the time budget is used up with the epoch of ``row`` (not yet recorded):
        the run validates this epoch, records it and stops."""
        used = sum(r["train_seconds"] for r in [*self.history, row]) / 60
        return self.budget is not None and used >= self.budget

    def end_epoch(self, row: dict[str, Any], score: float) -> None:
        """Record the epoch and save (``best.pt`` where ``score`` is the best so far)."""
        self.history.append(row)
        if not self.main:
            return
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        extra = {
            "config": self.config.model_dump(mode="json"),
            "epoch": row["epoch"],
            "history": self.history,
        }
        if score > self.best:
            self.best = score
            save_checkpoint(
                self.out_dir / "best.pt", self.kind, self.model_config, self.model, **extra
            )
        save_checkpoint(
            self.out_dir / "last.pt",
            self.kind,
            self.model_config,
            self.model,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            best=self.best,
            **extra,
        )
        pd.DataFrame(self.history).to_csv(self.out_dir / "metrics.csv", index=False)

    def close(self) -> pd.DataFrame:
        if self.writer is not None:
            self.writer.close()
        return pd.DataFrame(self.history)
