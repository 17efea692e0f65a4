"""Training data: JSONL records tokenised into padded batches, in a resumable order.

A record is {"text": ...} (loss on every token) or {"prompt": ..., "completion": ...} (loss on the
completion only: prompt labels are -100). The order is a fresh permutation per epoch drawn from
`seed + epoch`, and micro-batch b always holds stream positions [b·B, (b+1)·B): resuming needs only
the micro-batch counter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from spft.models.tokenizer import encode_text

IGNORE_INDEX = -100


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; a clear ValueError names the first malformed line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not ("text" in rec or
                                                  ("prompt" in rec and "completion" in rec)):
                raise ValueError(f"{path}:{lineno}: a record needs 'text' or "
                                 "'prompt' + 'completion'")
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def tokenize_record(tokenizer: Any, record: dict[str, Any],
                    max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record, truncated to `max_length` tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None else []
    if "text" in record:
        ids = prefix + encode_text(tokenizer, record["text"])
        labels = [IGNORE_INDEX] * len(prefix) + ids[len(prefix):]
    else:
        p = prefix + encode_text(tokenizer, record["prompt"])
        c = encode_text(tokenizer, record["completion"])
        ids = p + c
        labels = [IGNORE_INDEX] * len(p) + c
    return ids[:max_length], labels[:max_length]


class TokenizedDataset:
    """Tokenised records and a deterministic, resumable batch order."""

    def __init__(self, records: list[dict[str, Any]], tokenizer: Any, *, max_length: int,
                 seed: int = 0) -> None:
        self.examples = [tokenize_record(tokenizer, r, max_length) for r in records]
        self.examples = [e for e in self.examples if any(t != IGNORE_INDEX for t in e[1][1:])]
        if not self.examples:
            raise ValueError("no record has a token to train on after tokenisation/truncation")
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        self.pad_id = int(pad)
        self.seed = seed
        self._perms: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self), generator=g)}
        return self._perms[epoch]

    def batch(self, index: int, batch_size: int, *, shuffle: bool = True) -> dict[str, Tensor]:
        """Micro-batch number `index` (any non-negative int; epochs wrap around)."""
        n = len(self)
        rows = []
        for pos in range(index * batch_size, (index + 1) * batch_size):
            epoch, off = divmod(pos, n)
            rows.append(int(self._perm(epoch)[off]) if shuffle else off)
        return self.collate([self.examples[r] for r in rows])

    def collate(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(examples):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def eval_batches(self, batch_size: int, max_batches: int | None = None):
        """Fixed, unshuffled batches covering the data (at most `max_batches`)."""
        count = (len(self) + batch_size - 1) // batch_size
        if max_batches:
            count = min(count, max_batches)
        for b in range(count):
            chunk = self.examples[b * batch_size:(b + 1) * batch_size]
            yield self.collate(chunk)
