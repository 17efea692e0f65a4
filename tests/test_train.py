"""Trainer: smoke runs per method (loss falls), bit-exact resume, schedules, data loading."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from spft.models import ByteTokenizer, build_model, tiny_llama_config
from spft.models.tasks import generate_task
from spft.train import TokenizedDataset, TrainConfig, Trainer, lr_factor, read_jsonl
from spft.train.methods import available_methods

TOK = ByteTokenizer()


def _model(seed: int = 0):
    return build_model(tiny_llama_config(hidden_size=32, num_layers=2, num_heads=2), seed=seed)


def _data(task: str = "reverse", n: int = 256):
    return TokenizedDataset(generate_task(task, n), TOK, max_length=32, seed=0)


def _spiel_available() -> bool:
    try:
        import spft.spiel as spiel
        return hasattr(spiel, "SpIELController")
    except ImportError:
        return False


LRS = {"spiel-ag": 1e-1, "spiel-ma": 3e-1, "s2ft": 5e-2, "full": 5e-3, "lora": 2e-2}


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma", "s2ft", "full", "lora"])
def test_loss_falls(method):
    if method == "lora":
        pytest.importorskip("peft")
    cfg = TrainConfig(method=method, density=0.1, lora_rank=4, lr=LRS[method], max_steps=25,
                      batch_size=16, schedule="constant", progress=False,
                      reselect_every=10 if _spiel_available() else 0)
    trainer = Trainer(_model(), cfg, train_data=_data())
    rows = trainer.train()
    first = rows[0]["loss"]
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert last < first - 0.12, (method, first, last)
    assert trainer.num_trainable > 0


def test_registry_lists_all_methods():
    assert set(available_methods()) >= {"spiel-ag", "spiel-ma", "s2ft", "full", "lora"}


@pytest.mark.parametrize("method,grad_accum,optimizer", [
    pytest.param("spiel-ag", 2, "adamw", id="spiel-ag-accum2"),
    pytest.param("spiel-ma", 1, "sm3", id="spiel-ma-sm3"),
    pytest.param("s2ft", 1, "adamw", id="s2ft"),
    pytest.param("full", 2, "adamw", id="full-accum2"),
    pytest.param("lora", 1, "adamw", id="lora"),
])
def test_resume_is_bit_exact(tmp_path, method, grad_accum, optimizer):
    if method == "lora":
        pytest.importorskip("peft")
    def cfg(out):
        return TrainConfig(method=method, density=0.1, lr=2e-2 if optimizer == "adamw" else 0.1,
                           optimizer=optimizer, max_steps=8, batch_size=8,
                           grad_accum=grad_accum, warmup_steps=2, schedule="cosine",
                           progress=False, plot=False, output_dir=str(out),
                           reselect_every=3 if _spiel_available() else 0, drop_fraction=0.3)

    full_run = Trainer(_model(), cfg(tmp_path / "a"), train_data=_data()).train()
    # Interrupted: stop after 5 steps (checkpoint at 5), then resume in a fresh trainer.
    first = Trainer(_model(), cfg(tmp_path / "b"), train_data=_data())
    while first.step < 5:
        first.train_step()
    first.save_checkpoint()
    del first
    resumed = Trainer(_model(), cfg(tmp_path / "b"), train_data=_data())
    rows = resumed.train(resume_from=str(tmp_path / "b"))
    assert [r["step"] for r in rows] == [6, 7, 8]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_run[5:]]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [6, 7, 8]


def test_checkpoint_layout_and_keep(tmp_path):
    cfg = TrainConfig(method="full", max_steps=6, batch_size=4, save_every=2, progress=False,
                      plot=False, output_dir=str(tmp_path))
    Trainer(_model(), cfg, train_data=_data()).train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint-6" in names and "checkpoint-4" in names and "checkpoint-2" not in names
    assert (tmp_path / "latest").read_text() == "checkpoint-6"
    assert not [n for n in names if n.startswith(".tmp")]
    assert (tmp_path / "adapter.safetensors").exists()


def test_eval_metrics_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = TrainConfig(method="full", max_steps=4, batch_size=4, eval_every=2, eval_batches=2,
                      progress=False, output_dir=str(tmp_path))
    rows = Trainer(_model(), cfg, train_data=_data(), eval_data=_data(n=16)).train()
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[0]["eval_ppl"] == pytest.approx(math.exp(evals[0]["eval_loss"]))
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert all("tokens_per_s" in r and "lr" in r for r in rows)


def test_custom_loop_train_step_with_own_batches():
    data = _data()
    trainer = Trainer(_model(), TrainConfig(method="full", progress=False), train_data=None)
    row = trainer.train_step([data.batch(0, 4), data.batch(1, 4)])
    assert row["step"] == 1 and math.isfinite(row["loss"])
    with pytest.raises(ValueError, match="train_data"):
        trainer.train_step()


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules(schedule):
    f = [lr_factor(s, warmup_steps=4, max_steps=20, schedule=schedule) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0
    if schedule == "constant":
        assert set(f[4:]) == {1.0}
    else:
        assert all(a >= b for a, b in itertools.pairwise(f[4:])) and f[-1] < 0.1


def test_prompt_completion_masks_prompt(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ab", "completion": "cd"}) + "\n"
                    + json.dumps({"text": "xyz"}) + "\n")
    ds = TokenizedDataset(read_jsonl(path), TOK, max_length=16)
    batch = ds.collate(ds.examples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids[0].tolist()[:5] == [TOK.bos_token_id, *b"abcd"]
    assert labels[0].tolist()[:5] == [-100, -100, -100, ord("c"), ord("d")]
    assert labels[1].tolist()[:4] == [-100, *b"xyz"]
    assert mask[1].tolist() == [1, 1, 1, 1, 0]
    assert ids[1, 4] == TOK.pad_token_id and labels[1, 4] == -100


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(path)
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r":2: not valid JSON"):
        read_jsonl(path)


def test_batch_order_is_deterministic_and_wraps():
    ds = _data(n=10)
    a = ds.batch(7, 4)["input_ids"]
    assert torch.equal(a, _data(n=10).batch(7, 4)["input_ids"])


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="nope")
    with pytest.raises(ValueError, match="density"):
        TrainConfig(density=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    cfg = TrainConfig(method="s2ft", max_steps=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_activation_checkpointing_and_bf16_run():
    cfg = TrainConfig(method="spiel-ag", density=0.1, max_steps=2, batch_size=4, bf16=True,
                      activation_checkpointing=True, progress=False, reselect_every=0)
    trainer = Trainer(_model(), cfg, train_data=_data())
    rows = trainer.train()
    assert trainer.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_qspiel_nf4_base_trains_and_resumes(tmp_path):
    def cfg():
        return TrainConfig(method="spiel-ag", quant="nf4", density=0.1, lr=5e-2, max_steps=4,
                           batch_size=8, progress=False, plot=False, output_dir=str(tmp_path),
                           reselect_every=0)
    trainer = Trainer(_model(), cfg(), train_data=_data())
    assert any(type(m).__name__ == "NF4Linear" for m in trainer.model.modules())
    while trainer.step < 2:
        trainer.train_step()
    trainer.save_checkpoint()
    rest = [trainer.train_step()["loss"] for _ in range(2)]
    resumed = Trainer(_model(), cfg(), train_data=_data())
    rows = resumed.train(resume_from=str(tmp_path))
    assert [r["loss"] for r in rows] == rest


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma"])
def test_merged_mode_matches_materialising(method):
    def run(merged):
        cfg = TrainConfig(method=method, density=0.1, lr=0.05, max_steps=6, batch_size=8,
                          merged=merged, progress=False, reselect_every=3)
        trainer = Trainer(_model(), cfg, train_data=_data())
        return [r["loss"] for r in trainer.train()], trainer
    plain, _ = run(False)
    merged, trainer = run(True)
    assert all(m.merged for m in trainer.model.modules() if hasattr(m, "dv"))
    torch.testing.assert_close(torch.tensor(merged), torch.tensor(plain), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["spiel-ag", "spiel-ma"])
def test_qspiel_drop_and_grow_on_nf4_base(method):
    """qSpIEL-AG gathers candidate statistics through the 4-bit forward and SM3 (qSpIEL-MA)
    steps deltas on a 4-bit base: reselections regrow indices and keep the invariants."""
    cfg = TrainConfig(method=method, quant="nf4", density=0.1, lr=5e-2, max_steps=8,
                      batch_size=8, progress=False, plot=False, reselect_every=4)
    trainer = Trainer(_model(), cfg, train_data=_data())
    layers = [m for m in trainer.model.modules() if hasattr(m, "dv")]
    assert layers and all(m.base_4bit is not None for m in layers)
    before = [m.idx.clone() for m in layers]
    rows = trainer.train()
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert any(not torch.equal(m.idx, b) for m, b in zip(layers, before)), "nothing regrown"
    for m, b in zip(layers, before):
        assert m.idx.numel() == b.numel()
        assert torch.all(m.idx[1:] > m.idx[:-1])
