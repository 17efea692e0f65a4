"""`Trainer`: fine-tune a Hugging Face causal LM with a spft method, in your loop or ours.

    trainer = Trainer(model, cfg, train_data=TokenizedDataset(...), eval_data=...)
    trainer.train()                       # the whole run, with progress, eval, checkpoints
    # or, in a custom loop:
    for _ in range(n): metrics = trainer.train_step()          # next batches from train_data
    metrics = trainer.train_step([batch])                      # or your own micro-batches

One optimizer step = `grad_accum` micro-batches (forward, loss / grad_accum, backward), gradient
clipping, LR from the schedule, `optimizer.step()`, then the method's post-step hook (SpIEL
reselection, merged-weight refresh). Micro-batch b of the run is always the same data (see
`spft.train.data`), so a resumed run replays the uninterrupted one bit-exactly.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from spft.train.checkpoint import (
    ADAPTER_FILE,
    load_checkpoint_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from spft.train.config import TrainConfig
from spft.train.data import TokenizedDataset
from spft.train.methods import Method, get_method
from spft.train.metrics import MetricsLog, perplexity, plot_metrics
from spft.train.schedule import lr_factor, set_lr


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of trainable params + their grads + optimizer state + spft index buffers."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            total += 2 * p.numel() * p.element_size()
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    for name, b in model.named_buffers():
        if name.endswith((".idx", ".base_values")):
            total += b.numel() * b.element_size()
    return total


class Trainer:
    """Prepares `model` with `cfg.method` and trains it.

    Args:
        model: a Hugging Face causal LM (`forward(input_ids, attention_mask, labels) -> .loss`),
            not yet prepared; the trainer converts it to bf16 (`cfg.bf16`), enables activation
            checkpointing, and applies the method. `self.model` is the prepared model.
        cfg: the run's `TrainConfig`.
        train_data / eval_data: `TokenizedDataset`s (eval optional).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, *,
                 train_data: TokenizedDataset | None = None,
                 eval_data: TokenizedDataset | None = None, method: Method | None = None) -> None:
        self.cfg = cfg
        self.train_data = train_data
        self.eval_data = eval_data
        torch.manual_seed(cfg.seed)
        if cfg.bf16:
            model = model.to(torch.bfloat16)
        if cfg.activation_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError("activation_checkpointing needs a Hugging Face model")
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            if getattr(model, "config", None) is not None:
                model.config.use_cache = False
        self.method = method or get_method(cfg.method)
        self.base_fingerprints = self._fingerprints(model)
        self.model = self.method.prepare(model, cfg)
        self.model.train()  # HF skips activation checkpointing in eval mode
        self.optimizer = self.method.build_optimizer(self.model, cfg)
        self.method.attach(self.model, self.optimizer, cfg)
        self.step = 0
        self.device = _device_of(self.model)
        self.num_trainable = count_trainable(self.model)
        self.metrics = MetricsLog(None)
        self.reselections = 0

    # ------------------------------------------------------------------ helpers
    def _fingerprints(self, model: nn.Module) -> dict[str, str]:
        from spft.adapters.fingerprint import module_fingerprint
        from spft.train.methods import target_linears
        return {n: module_fingerprint(m)
                for n, m in target_linears(model, self.cfg.target_modules).items()}

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _next_batches(self) -> list[dict[str, torch.Tensor]]:
        if self.train_data is None:
            raise ValueError("train_step() without batches needs train_data")
        first = self.step * self.cfg.grad_accum
        return [self.train_data.batch(first + i, self.cfg.batch_size)
                for i in range(self.cfg.grad_accum)]

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """One optimizer step over `batches` (default: the next `grad_accum` micro-batches of
        train_data). Returns {"step", "loss", "lr", "tokens", "step_time_s", events...}."""
        cfg = self.cfg
        batches = batches if batches is not None else self._next_batches()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        lr = set_lr(self.optimizer, cfg.lr, lr_factor(self.step, warmup_steps=cfg.warmup_steps,
                                                      max_steps=cfg.max_steps,
                                                      schedule=cfg.schedule))
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        tokens = 0
        for batch in batches:
            batch = self._to_device(batch)
            out = self.model(**batch, use_cache=False)
            loss = out.loss
            (loss / len(batches)).backward()
            loss_sum += loss.detach().float()
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
                else batch["input_ids"].numel()
        self.method.before_optimizer_step(self.step)
        grad_norm = None
        if cfg.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]
                      if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        events = self.method.after_optimizer_step(self.step) or {}
        if events.get("reselection"):
            self.reselections += 1
        self.step += 1
        loss_value = float(loss_sum) / len(batches)
        if cuda:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        row: dict[str, Any] = {"step": self.step, "loss": loss_value, "lr": lr,
                               "tokens": tokens, "step_time_s": dt,
                               "tokens_per_s": tokens / dt if dt > 0 else 0.0}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        if cuda:
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        row.update(events)
        return row

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: TokenizedDataset | None = None) -> dict[str, float]:
        """Token-weighted mean loss and perplexity over (up to `eval_batches`) batches."""
        data = data or self.eval_data
        if data is None:
            raise ValueError("evaluate() needs eval data")
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in data.eval_batches(self.cfg.batch_size, self.cfg.eval_batches):
            batch = self._to_device(batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(self.model(**batch, use_cache=False).loss) * n
            count += n
        self.model.train(was_training)
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": perplexity(loss)}

    # ------------------------------------------------------------------ checkpoints
    def save_adapter(self, path: str) -> None:
        from spft.adapters import save_adapter
        save_adapter(self.model, path, method=self.method.adapter_method(),
                     base_fingerprints=self.base_fingerprints or None,
                     extra={"config": self.cfg.to_dict()})

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(), "rng": rng_state(),
                "config": self.cfg.to_dict(), "reselections": self.reselections,
                "exact_tensors": self.method.exact_tensors(self.model)}

    def save_checkpoint(self, output_dir: str | None = None) -> str:
        output_dir = output_dir or self.cfg.output_dir
        if output_dir is None:
            raise ValueError("save_checkpoint needs an output_dir")
        return save_checkpoint(output_dir, self.step, write_adapter=self.save_adapter,
                               state=self.state())

    def load_checkpoint(self, path: str) -> int:
        """Restore adapter, optimizer, method state, RNG and step from a checkpoint (directory or
        output_dir). Returns the step reached."""
        from spft.adapters import load_adapter

        ckpt = resolve_checkpoint(path)
        state = load_checkpoint_state(ckpt)
        load_adapter(self.model, os.path.join(ckpt, ADAPTER_FILE))
        exact = state.get("exact_tensors") or {}
        if exact:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in exact.items():
                    params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.reselections = int(state.get("reselections", 0))
        return self.step

    # ------------------------------------------------------------------ the run
    def train(self, *, resume_from: str | None = None) -> list[dict[str, Any]]:
        """Train to `cfg.max_steps`: progress bar, metrics JSONL, periodic eval and checkpoints,
        final adapter + plot in `cfg.output_dir`. Returns the metric rows."""
        cfg = self.cfg
        if resume_from:
            self.load_checkpoint(resume_from)
        out = cfg.output_dir
        self.metrics = MetricsLog(os.path.join(out, "metrics.jsonl") if out else None,
                                  resume_step=self.step if resume_from else None)
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress,
                   desc=cfg.method, dynamic_ncols=True)
        try:
            while self.step < cfg.max_steps:
                row = self.train_step()
                last = self.step == cfg.max_steps
                if self.eval_data is not None and (
                        (cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    row.update(self.evaluate())
                self.metrics.log(row)
                post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                if "peak_mem_gib" in row:
                    post["mem"] = f"{row['peak_mem_gib']:.1f}G"
                if self.method.has_controller:
                    post["resel"] = self.reselections
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if out and ((cfg.save_every and self.step % cfg.save_every == 0) or last):
                    self.save_checkpoint(out)
        finally:
            bar.close()
        if out:
            self.save_adapter(os.path.join(out, ADAPTER_FILE))
            if cfg.plot:
                plot_metrics(self.metrics.rows, os.path.join(out, "metrics.png"),
                             title=f"spft {cfg.method}")
        return self.metrics.rows


def train(model: nn.Module, cfg: TrainConfig, train_data: TokenizedDataset,
          eval_data: TokenizedDataset | None = None, *,
          resume_from: str | None = None) -> Trainer:
    """Build a `Trainer` and run it; returns the trainer (model, metrics rows, optimizer)."""
    trainer = Trainer(model, cfg, train_data=train_data, eval_data=eval_data)
    trainer.train(resume_from=resume_from)
    return trainer
