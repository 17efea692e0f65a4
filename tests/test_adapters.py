"""Adapter files: save/load/merge round trips, wrong-base and damaged-file errors, atomic writes."""

from __future__ import annotations

import os

import pytest
import torch

import spft
from spft.adapters import AdapterError, adapter_info, format_info, read_adapter
from spft.models import ByteTokenizer, build_model, tiny_llama_config
from spft.models.tasks import generate_task
from spft.train import TokenizedDataset, TrainConfig, Trainer

TOK = ByteTokenizer()
CONFIG = tiny_llama_config(hidden_size=32, num_layers=2, num_heads=2)


def _base(seed: int = 0):
    return build_model(CONFIG, seed=seed).eval()


def _trained(method: str, steps: int = 3):
    data = TokenizedDataset(generate_task("add", 64), TOK, max_length=24)
    cfg = TrainConfig(method=method, density=0.1, lr=5e-2, max_steps=steps, batch_size=8,
                      progress=False, reselect_every=0)
    trainer = Trainer(_base(), cfg, train_data=data)
    trainer.train()
    return trainer


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model):
    return model.eval()(_ids()).logits


@pytest.mark.parametrize("method", ["spiel-ag", "s2ft", "full"])
def test_save_load_merge_round_trip(tmp_path, method):
    trainer = _trained(method)
    path = tmp_path / "a.safetensors"
    trainer.save_adapter(str(path))
    expected = _logits(trainer.model)
    loaded = spft.load_adapter(_base(), path)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=1e-5)
    merged = spft.merge_adapter(_base(), path, dtype=None)
    assert not any(type(m).__name__ in ("SparseDeltaLinear", "S2Linear")
                   for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)
    merged16 = spft.merge_adapter(_base(), path)
    assert merged16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_spiel_adapter_contents(tmp_path):
    trainer = _trained("spiel-ma")
    path = tmp_path / "a.safetensors"
    trainer.save_adapter(str(path))
    tensors, meta = read_adapter(path)
    assert meta["method"] == "spiel-ma" and meta["spft_version"] == spft.__version__
    idx = [t for k, t in tensors.items() if k.endswith(".idx")]
    assert idx and all(t.dtype == torch.int32 for t in idx)
    assert all(bool((t[1:] > t[:-1]).all()) for t in idx)
    lay = next(iter(meta["layers"].values()))
    assert lay["index_dtype"] == "int32" and len(lay["shape"]) == 2 and lay["fingerprint"]
    assert meta["fingerprint"]
    info = adapter_info(path)
    assert info["trainable_values"] == trainer.num_trainable
    text = format_info(info)
    assert "spiel-ma" in text and "int32" in text


def test_spiel_load_merged_mode_matches(tmp_path):
    trainer = _trained("spiel-ag")
    path = tmp_path / "a.safetensors"
    trainer.save_adapter(str(path))
    model = spft.load_adapter(_base(), path, merged=True)
    torch.testing.assert_close(_logits(model), _logits(trainer.model), atol=1e-5, rtol=1e-5)
    # the fingerprint still describes the base (the merged weights hold the deltas)
    spft.save_adapter(model, tmp_path / "b.safetensors", method="spiel-ag")
    assert read_adapter(tmp_path / "b.safetensors")[1]["fingerprint"] == \
        read_adapter(path)[1]["fingerprint"]


def test_s2ft_adapter_stores_permutation(tmp_path):
    trainer = _trained("s2ft")
    path = tmp_path / "a.safetensors"
    trainer.save_adapter(str(path))
    tensors, meta = read_adapter(path)
    assert meta["method"] == "s2ft"
    perms = [k for k in tensors if k.startswith("s2ft.ffn_perm.")]
    assert len(perms) == CONFIG.num_hidden_layers
    p = tensors[perms[0]].long()
    assert torch.equal(p.sort().values, torch.arange(CONFIG.intermediate_size))
    assert all(lay["axis"] in ("input", "output") for lay in meta["layers"].values())


@pytest.mark.parametrize("method", ["spiel-ag", "s2ft"])
def test_mismatched_base_is_refused(tmp_path, method):
    trainer = _trained(method)
    path = tmp_path / "a.safetensors"
    trainer.save_adapter(str(path))
    other = _base(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterError, match="wrong base model"):
        spft.load_adapter(other, path)
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model changed on refusal"
    bigger = build_model(tiny_llama_config(hidden_size=48, num_layers=2, num_heads=2))
    with pytest.raises(AdapterError, match="wrong base model"):
        spft.load_adapter(bigger, path)
    # an explicit opt-out exists for deliberate transfers
    spft.load_adapter(_base(seed=1), path, check_base=False)


def test_corrupt_and_truncated_files(tmp_path):
    trainer = _trained("spiel-ag", steps=1)
    path = tmp_path / "a.safetensors"
    trainer.save_adapter(str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("trunc", "garbage", "empty"):
        with pytest.raises(AdapterError, match="truncated or corrupt"):
            spft.load_adapter(_base(), tmp_path / f"{name}.safetensors")
    with pytest.raises(AdapterError, match="not found"):
        spft.load_adapter(_base(), tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterError, match="not a spft adapter"):
        read_adapter(tmp_path / "plain.safetensors")


def test_out_of_range_indices_rejected(tmp_path):
    trainer = _trained("spiel-ag", steps=1)
    path = tmp_path / "a.safetensors"
    trainer.save_adapter(str(path))
    tensors, meta = read_adapter(path)
    name = next(k for k in tensors if k.endswith(".idx"))
    tensors[name][-1] = 10**8
    from spft.adapters.io import atomic_save_safetensors
    raw = {k: (v if not isinstance(v, (dict, list)) else __import__("json").dumps(v))
           for k, v in meta.items()}
    atomic_save_safetensors(tensors, tmp_path / "bad.safetensors", raw)
    with pytest.raises(AdapterError, match="outside"):
        read_adapter(tmp_path / "bad.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    trainer = _trained("spiel-ag", steps=1)
    path = tmp_path / "a.safetensors"
    trainer.save_adapter(str(path))
    old = path.read_bytes()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_adapter(str(path))
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["a.safetensors"]
