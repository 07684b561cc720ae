"""The training loop: AdamW, warm-up + decay, accumulation, clipping, validation with early
stopping, atomic checkpoints with exact resume, DDP when launched by torchrun.

A step's loss is the mean over all of its trained tokens (every micro-batch, every rank), not
the mean of per-micro-batch means, so its gradient does not depend on how the step's examples
are cut into micro-batches or spread over processes."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, checkpoint_paths, latest_checkpoint, load_checkpoint, prune_checkpoints,
                         read_metrics, resume_point, save_checkpoint, seal_checkpoint)
from .config import TrainConfig
from .context import activation_context
from .evaluate import NonFiniteError, evaluate_loss
from .tasks import batch_loss, loss_units
from .outputs import write_dir
from .sharded_checkpoint import SHARDED, all_finite, is_sharded_dir, load_sharded, save_sharded, write_sharded_dir
from .sharding import full, full_trainable, load_named_optimizer_state, named_optimizer_state, reshard_all


class TrainingStopped(Exception):
    """SIGINT/SIGTERM: the run finished its step, wrote a checkpoint and stopped."""

    def __init__(self, step: int, checkpoint: Path, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; its state is in "
                         f"{checkpoint}: run the same command with --resume to continue")


# hook(step, validation loss), called after each validation of the runs inside `on_validation`
_validation_hooks: list[Callable[[int, float], None]] = []


@contextlib.contextmanager
def on_validation(hook: Callable[[int, float], None]):
    """Within the block, each run calls hook(step, validation loss) after every validation (the
    best weights already kept); a hook that raises stops the run there, as any error does.
    `trilora sweep` reports to its pruner this way."""
    _validation_hooks.append(hook)
    try:
        yield hook
    finally:
        _validation_hooks.remove(hook)


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
    # under FSDP the registered parameters must be the shards: after a forward without
    # backward (the evaluation before training) the root's are transient gathered copies
    reshard_all(model)
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
                 autocast_dtype: torch.dtype | None = None, data_fingerprint: str | None = None,
                 task: str = "generate", class_weights: torch.Tensor | None = None):
        self.model, self.config, self.device = model, config, device
        self.unwrapped = getattr(model, "module", model)  # under DDP: the model it wraps (its parameter names)
        self.task, self.class_weights = task, class_weights  # see trainer.tasks
        self.train_batches, self.val_batches = train_batches, val_batches
        self.write_weights, self.read_weights = write_weights, read_weights
        self.autocast_dtype = autocast_dtype
        self.data_fingerprint = data_fingerprint
        self.out = Path(config.output_dir)
        # a fully fine-tuned model under FSDP: checkpoints and best/ written shard by shard (DCP)
        self.sharded_full = config.fsdp and config.method == "full"
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
        self.skipped_steps = 0
        self.history: list[dict] = []
        self.stop_signal = 0

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
                "config": self.config.to_dict(), "total_steps": self.total_steps,
                "data_fingerprint": self.data_fingerprint, "skipped_steps": self.skipped_steps,
                "world_size": self.world}

    def resume(self) -> bool:
        """Continue from the newest checkpoint in the output dir; False when there is none."""
        path = resume_point(self.out, self.config)
        if path is None:
            return False
        state = load_checkpoint(path, self._load_optimizer_state, self.scheduler)
        saved_data = state.get("data_fingerprint")
        if saved_data is not None and self.data_fingerprint is not None and saved_data != self.data_fingerprint:
            raise CheckpointError(f"cannot resume from {path}: the training examples differ from those the run "
                                  "started with (a data file changed?); restore them, or start a new run")
        self.skipped_steps = state.get("skipped_steps", 0)
        if state.get("total_steps") not in (None, self.total_steps):
            # allowed (train longer or shorter), but the lr schedule's shape changes: say so
            warnings.warn(f"resuming a run planned for {state['total_steps']} steps as one of "
                          f"{self.total_steps}: the learning-rate schedule is stretched accordingly")
        if is_sharded_dir(path / SHARDED):  # written shard by shard (`_save_sharded`): DCP reshards it
            load_sharded(path / SHARDED, self.unwrapped, self.optimizer)
        else:
            with full_trainable(self.unwrapped):  # under FSDP: read into whole tensors, then back into the shards
                self.read_weights(path / "weights")
        self.train_batches.load_state_dict(state["data"])
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]
        history = self.out / "metrics.jsonl"
        if history.exists():  # drop records written after the checkpoint by the killed run
            kept = [r for r in read_metrics(history) if r.get("step", 0) <= self.step]
            self.history = kept
            if self.rank == 0:
                history.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return True

    def _load_optimizer_state(self, saved: dict) -> None:
        if saved.pop("by_name"):
            load_named_optimizer_state(self.unwrapped, self.optimizer, saved)
        else:  # an older checkpoint: indices in this optimizer's parameter order
            self.optimizer.load_state_dict(saved)

    def validate(self) -> dict:
        return evaluate_loss(self.model, self.val_batches, self.device, self.autocast_dtype, self.task)

    # -------------------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Train to `total_steps` (or early stop); return {"steps", "best", "stopped_early"}."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        stream = self._micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0, desc="train")
        stopped_early = False
        try:
            with _stop_signals(self):
                while self.step < self.total_steps:
                    stopped_early = self._one_step(stream, bar)
                    if stopped_early:
                        break
        finally:
            bar.close()  # before any error message, not after it
        if self.world > 1:
            dist.barrier()  # rank 0 may still be writing <out>/best, which every rank reads next
        return {"steps": self.step, "best": self.best, "stopped_early": stopped_early}

    def _one_step(self, stream, bar) -> bool:
        """One optimizer step (plus logging, validation, checkpoint); True when early stopping says stop."""
        cfg, model = self.config, self.model
        stopped_early = False
        start, tokens = time.perf_counter(), 0
        # every rank draws the step's world * grad_accum micro-batches and keeps its share,
        # so the data position is the same on all ranks and in 1-process runs
        drawn = [next(stream) for _ in range(cfg.grad_accum * self.world)]
        mine = [b for i, b in enumerate(drawn) if i % self.world == self.rank]
        # token-weighted: the step's loss is the mean over all of its trained tokens, so
        # batch 8 x accum 1 and batch 4 x accum 2 (or 2 ranks) give the same gradient;
        # the factor `world` undoes DDP's averaging of the ranks' gradients
        step_tokens = max(1, sum(loss_units(b, self.task) for b in drawn))
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(mine):
            weight = loss_units(batch, self.task) * self.world / step_tokens
            tokens += _input_tokens(batch)  # counted on the host copy: no device sync
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            sync = i == len(mine) - 1 or not hasattr(model, "no_sync")
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
                sync = i == len(mine) - 1
                model.set_requires_gradient_sync(sync)
            ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
            with ctx, torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                     enabled=self.autocast_dtype is not None):
                with activation_context(model, cfg.offload_activations):  # --offload-activations
                    loss = batch_loss(model, batch, self.task, self.class_weights) * weight
                loss.backward()
            step_loss += loss.detach()
        loss_sum = step_loss.item()  # one device sync per step, not per micro-batch
        stop = self.stop_signal
        if self.world > 1:  # every rank agrees on the loss, the tokens and a stop request
            stats = torch.tensor([loss_sum, tokens, stop], device=self.device, dtype=torch.float64)
            dist.all_reduce(stats)
            loss_sum, tokens = stats[0].item() / self.world, int(stats[1].item())
            stop = int(stats[2].item() > 0) and (self.stop_signal or signal.SIGTERM)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # the norm is computed even without clipping: a NaN/Inf gradient must not reach the weights
        grad_norm = float(full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                               else _total_norm(params)))
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if not finite:
            self._skip_bad_step(loss_sum, grad_norm)
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
        if not finite:
            return False  # skipped: no record, no validation, no checkpoint of this step
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            record = {"step": self.step, "loss": loss_sum, "lr": lr, "tokens_per_s": tokens / elapsed}
            if cfg.max_grad_norm > 0:
                record["grad_norm"] = grad_norm
            self._log(record)
        at_end = self.step == self.total_steps
        if self.val_batches and ((cfg.eval_every and self.step % cfg.eval_every == 0) or at_end):
            stopped_early = self._validate_and_keep_best()
        if stop and not at_end and not stopped_early:
            raise TrainingStopped(self.step, self._save(), stop)
        if cfg.save_every and (self.step % cfg.save_every == 0) and not at_end and not stopped_early:
            self._save()
        return stopped_early

    def _skip_bad_step(self, loss: float, grad_norm: float) -> None:
        """A step whose loss or gradients are NaN/Inf changes nothing; too many stop the run."""
        self.skipped_steps += 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.skipped_steps > self.config.max_skipped_steps:
            last = latest_checkpoint(self.out)
            raise NonFiniteError(
                f"step {self.step + 1}: {what}; stopped (the weights are those after step {self.step}"
                f"{f', the last checkpoint {last}' if last else ''}). A lower --lr, --max-grad-norm, or "
                f"bf16/fp32 instead of fp16 usually helps; --max-skipped-steps N skips up to N such steps")
        warnings.warn(f"step {self.step + 1}: {what}: step skipped ({self.skipped_steps} of at most "
                      f"{self.config.max_skipped_steps})")

    def check_weights_finite(self) -> None:
        """Raise NonFiniteError when a trainable weight holds NaN/Inf (nothing such is written)."""
        for name, p in self.model.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                raise NonFiniteError(f"step {self.step}: the trainable weight {name} holds NaN/Inf values; "
                                     "stopped without writing it")

    def _validate_and_keep_best(self) -> bool:
        val = self.validate()
        self._log({"step": self.step, "val_loss": val["loss"], "val_perplexity": val["perplexity"]})
        if not math.isfinite(val["loss"]):
            raise NonFiniteError(f"step {self.step}: the validation loss is {val['loss']}; stopped")
        if val["loss"] < self.best["val_loss"]:
            self.best, self.bad_evals = {"val_loss": val["loss"], "step": self.step}, 0
            if self.sharded_full:  # the whole model: each rank writes its shards, nothing is gathered
                self._check_shards_finite()
                write_sharded_dir(self.unwrapped, self.out / "best")
            else:
                with full_trainable(self.unwrapped):  # every rank: under FSDP a gather
                    if self.rank == 0:
                        self.check_weights_finite()
                        write_dir(self.write_weights, self.out / "best")
        else:
            self.bad_evals += 1
        if self.rank == 0:
            tqdm.write(f"step {self.step}: validation loss {val['loss']:.4f} (best {self.best['val_loss']:.4f} "
                       f"at step {self.best['step']})")
        for hook in list(_validation_hooks):
            hook(self.step, val["loss"])
        return bool(self.config.patience) and self.bad_evals >= self.config.patience

    def _save(self) -> Path:
        if self.sharded_full:
            return self._save_sharded()
        path = self.out / "checkpoints" / f"step-{self.step}"
        optimizer_state = named_optimizer_state(self.unwrapped, self.optimizer)  # every rank: whole tensors
        with full_trainable(self.unwrapped):
            if self.rank == 0:
                self.check_weights_finite()
                path = save_checkpoint(self.out, self.step, self.write_weights, optimizer_state, self.scheduler,
                                       self._trainer_state())
                prune_checkpoints(self.out, self.config.keep_checkpoints)
        if self.world > 1:
            dist.barrier()
        return path


    def _save_sharded(self) -> Path:
        """A fully fine-tuned model under FSDP: every rank writes its shards of the weights and
        the optimizer state (`sharded_checkpoint`), rank 0 the rest and the seal."""
        root, tmp, final = checkpoint_paths(self.out, self.step, shared=True)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._check_shards_finite()
        dist.barrier()
        save_sharded(tmp / SHARDED, self.unwrapped, self.optimizer)
        dist.barrier()
        if self.rank == 0:
            seal_checkpoint(tmp, final, None, self.scheduler, self._trainer_state())
            prune_checkpoints(self.out, self.config.keep_checkpoints)
        dist.barrier()
        return final

    def _check_shards_finite(self) -> None:
        bad = all_finite(self.unwrapped)
        if bad:
            raise NonFiniteError(f"step {self.step}: the trainable weight {bad[0]} holds NaN/Inf values; "
                                 "stopped without writing it")


def _total_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)  # DTensor gradients (FSDP) too


def _input_tokens(batch: dict) -> int:
    """Non-padding input tokens of `batch` (all of them when packed rows carry a 4-D mask)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.ne(0).sum())
    return batch["input_ids"].numel()


@contextlib.contextmanager
def _stop_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the trainer to stop after the current step (a second SIGINT aborts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum, frame):
        if trainer.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = signum
        if trainer.rank == 0:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                  "(Ctrl-C again to abort at once)", flush=True)
    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
