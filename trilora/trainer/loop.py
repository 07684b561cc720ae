"""The training loop: AdamW, warm-up + decay, accumulation, clipping, validation with early
stopping, atomic checkpoints with exact resume, DDP when launched by torchrun.

A step's loss is the mean over all of its trained tokens (every micro-batch, every rank), not
the mean of per-micro-batch means, so its gradient does not depend on how the step's examples
are cut into micro-batches or spread over processes."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint,
                         verify_checkpoint)
from .config import TrainConfig
from .evaluate import evaluate_loss


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine/linear decay to 0 or constant."""
    warm = config.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if config.scheduler == "cosine" else 1 - progress
    return factor


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device):
    """AdamW over the trainable parameters; no weight decay on biases and norm weights."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, **fast)


class Trainer:
    """Runs the optimisation of `model` on `train_batches` (a resumable `BatchIterator`).

    write_weights(dir) / read_weights(dir) save and restore the trainable weights (a PEFT
    adapter or the full model); val_batches is a list of batches or None.
    """

    def __init__(self, model, config: TrainConfig, train_batches, val_batches, device: torch.device,
                 write_weights: Callable[[Path], None], read_weights: Callable[[Path], None],
                 autocast_dtype: torch.dtype | None = None):
        self.model, self.config, self.device = model, config, device
        self.train_batches, self.val_batches = train_batches, val_batches
        self.write_weights, self.read_weights = write_weights, read_weights
        self.autocast_dtype = autocast_dtype
        self.out = Path(config.output_dir)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        micro_per_epoch = len(train_batches)
        per_step = config.grad_accum * self.world
        if micro_per_epoch < 1:
            raise ValueError("no training batches")
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * micro_per_epoch / per_step))
        self.optimizer = build_optimizer(model, config, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config, self.total_steps))
        self.step = 0
        self.best = {"val_loss": math.inf, "step": 0}
        self.bad_evals = 0
        self.history: list[dict] = []

    # -------------------------------------------------------------------------- helpers

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _micro_batches(self):
        while True:  # epochs, resumable mid-epoch through train_batches' position
            yield from self.train_batches

    def _trainer_state(self) -> dict:
        return {"data": self.train_batches.state_dict(), "best": self.best, "bad_evals": self.bad_evals,
                "config": self.config.to_dict(), "total_steps": self.total_steps}

    def resume(self) -> bool:
        """Continue from the newest checkpoint in the output dir; False when there is none."""
        path = resume_point(self.out, self.config)
        if path is None:
            return False
        state = load_checkpoint(path, self.optimizer, self.scheduler)
        if state.get("total_steps") not in (None, self.total_steps):
            # allowed (train longer or shorter), but the lr schedule's shape changes: say so
            warnings.warn(f"resuming a run planned for {state['total_steps']} steps as one of "
                          f"{self.total_steps}: the learning-rate schedule is stretched accordingly")
        self.read_weights(path / "weights")
        self.train_batches.load_state_dict(state["data"])
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]
        history = self.out / "metrics.jsonl"
        if history.exists():  # drop records written after the checkpoint by the killed run
            kept = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            kept = [r for r in kept if r.get("step", 0) <= self.step]
            self.history = kept
            if self.rank == 0:
                history.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return True

    def validate(self) -> dict:
        return evaluate_loss(self.model, self.val_batches, self.device, self.autocast_dtype)

    # -------------------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Train to `total_steps` (or early stop); return {"steps", "best", "stopped_early"}."""
        cfg, model = self.config, self.model
        self.out.mkdir(parents=True, exist_ok=True)
        model.train()
        stream = self._micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0, desc="train")
        stopped_early = False
        while self.step < self.total_steps:
            start, tokens = time.perf_counter(), 0
            # every rank draws the step's world * grad_accum micro-batches and keeps its share,
            # so the data position is the same on all ranks and in 1-process runs
            drawn = [next(stream) for _ in range(cfg.grad_accum * self.world)]
            mine = [b for i, b in enumerate(drawn) if i % self.world == self.rank]
            # token-weighted: the step's loss is the mean over all of its trained tokens, so
            # batch 8 x accum 1 and batch 4 x accum 2 (or 2 ranks) give the same gradient;
            # the factor `world` undoes DDP's averaging of the ranks' gradients
            step_tokens = max(1, sum(_trained_tokens(b) for b in drawn))
            step_loss = torch.zeros((), device=self.device)
            for i, batch in enumerate(mine):
                weight = _trained_tokens(batch) * self.world / step_tokens
                tokens += _input_tokens(batch)  # counted on the host copy: no device sync
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                sync = i == len(mine) - 1 or not hasattr(model, "no_sync")
                ctx = model.no_sync() if not sync else contextlib.nullcontext()
                with ctx, torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                         enabled=self.autocast_dtype is not None):
                    loss = model(**batch).loss * weight
                    loss.backward()
                step_loss += loss.detach()
            loss_sum = step_loss.item()  # one device sync per step, not per micro-batch
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], cfg.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.world > 1:
                stats = torch.tensor([loss_sum, tokens], device=self.device, dtype=torch.float64)
                dist.all_reduce(stats)
                loss_sum, tokens = stats[0].item() / self.world, int(stats[1].item())
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                record = {"step": self.step, "loss": loss_sum, "lr": lr, "tokens_per_s": tokens / elapsed}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                self._log(record)
            at_end = self.step == self.total_steps
            if self.val_batches and ((cfg.eval_every and self.step % cfg.eval_every == 0) or at_end):
                stopped_early = self._validate_and_keep_best()
            if cfg.save_every and (self.step % cfg.save_every == 0) and not at_end and not stopped_early:
                self._save()
            if stopped_early:
                break
        bar.close()
        if self.world > 1:
            dist.barrier()  # rank 0 may still be writing <out>/best, which every rank reads next
        return {"steps": self.step, "best": self.best, "stopped_early": stopped_early}

    def _validate_and_keep_best(self) -> bool:
        val = self.validate()
        self._log({"step": self.step, "val_loss": val["loss"], "val_perplexity": val["perplexity"]})
        if val["loss"] < self.best["val_loss"]:
            self.best, self.bad_evals = {"val_loss": val["loss"], "step": self.step}, 0
            if self.rank == 0:
                _write_atomically(self.write_weights, self.out / "best")
        else:
            self.bad_evals += 1
        return bool(self.config.patience) and self.bad_evals >= self.config.patience

    def _save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.out, self.step, self.write_weights, self.optimizer, self.scheduler,
                            self._trainer_state())
        if self.world > 1:
            dist.barrier()


def _trained_tokens(batch: dict) -> int:
    """Tokens of `batch` in the loss: labels other than -100, after HF's shift by one."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _input_tokens(batch: dict) -> int:
    """Non-padding input tokens of `batch` (all of them when packed rows carry a 4-D mask)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.ne(0).sum())
    return batch["input_ids"].numel()


def _write_atomically(write: Callable[[Path], None], path: Path) -> None:
    """write(dir) into a temp dir, then swap it in: a kill never leaves a half-written `path`
    (at worst the previous one, under .old-<name>)."""
    tmp, old = path.with_name(f".tmp-{path.name}"), path.with_name(f".old-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def resume_point(output_dir: Path, config: TrainConfig) -> Path | None:
    """The newest checkpoint in `output_dir`, verified intact and made with `config`'s settings
    (those in `TrainConfig.RESUME_KEYS`); None when there is none. Raises CheckpointError."""
    path = latest_checkpoint(output_dir)
    if path is None:
        return None
    verify_checkpoint(path)
    try:
        saved = json.loads((path / "trainer_state.json").read_text())["config"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{path / 'trainer_state.json'} is not a trilora trainer state: {err}") from None
    now = config.to_dict()
    changed = [k for k in TrainConfig.RESUME_KEYS if saved.get(k) != now.get(k)]
    if changed:
        raise CheckpointError(f"cannot resume from {path}: it was made with different settings "
                              f"({', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in changed)}); "
                              "use the same settings, or another --output-dir")
    return path
