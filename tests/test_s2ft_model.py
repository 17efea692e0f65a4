"""S2FT on tiny Hugging Face LLaMA-family models: selection, co-permutation, adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close

from spft.nn import S2Linear
from spft.s2ft import (
    S2FTConfig,
    apply_adapter,
    export_adapter,
    fuse_adapters,
    load_adapter,
    make_selection,
    prepare_s2ft,
    remove_adapter,
    restore_original_order,
    s2_modules,
    save_adapter,
    select_s2ft,
    serve_adapters,
    switch_adapter,
)

transformers = pytest.importorskip("transformers")

KINDS = {
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", 4),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", 2),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", 2),
    "qwen2-gqa": ("Qwen2Config", "Qwen2ForCausalLM", 2),
}


def tiny_model(kind: str, dtype=torch.float32, seed: int = 0):
    cfg_name, model_name, n_kv = KINDS[kind]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(dtype)
    # give Qwen2's q/k/v biases non-zero values so their permutation is exercised
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def ids(batch=2, length=11, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_permutation_preserves_outputs(kind, dtype):
    model = tiny_model(kind, dtype)
    x = ids()
    with torch.no_grad():
        before = model(x).logits.float()
    cfg = S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, attn_on_gqa=True, train_gate_up=True,
                     train_qkv=True, seed=3)
    sel = select_s2ft(model, cfg)
    assert all(0 < g.numel() < sel.groups[0].numel() * 2 + 1 for g in sel.groups)
    original = copy.deepcopy(model.state_dict())
    prepare_s2ft(model, sel)
    assert any(isinstance(m, S2Linear) for m in model.modules())
    with torch.no_grad():
        after = model(x).logits.float()
    assert_close(after, before, dtype, scale=1.0 if dtype == torch.float32 else 2.0)
    # only the S2 blocks train
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("trainable") for n in names)
    # the permutation maps back exactly
    restore_original_order(model)
    restored = model.state_dict()
    for k, v in original.items():
        assert torch.equal(restored[k], v), k


def test_selection_strategies_deterministic():
    model = tiny_model("llama-mha")
    cal = {"input_ids": ids(4, 9, seed=5)}
    for strategy in ("random", "weight_norm", "activation"):
        cfg = S2FTConfig(ffn_count=11, attn_count=3, strategy=strategy, seed=7)
        a = select_s2ft(model, cfg, calibration=cal)
        b = select_s2ft(model, cfg, calibration=cal)
        assert [c.tolist() for c in a.channels] == [c.tolist() for c in b.channels]
        assert [c.numel() for c in a.channels] == [6, 5]  # spread over blocks
        assert [g.numel() for g in a.groups] == [2, 1]
        assert all(c.unique().numel() == c.numel() for c in a.channels)
    small = select_s2ft(model, S2FTConfig(ffn_count=2, strategy="activation"), calibration=cal)
    large = select_s2ft(model, S2FTConfig(ffn_count=2, strategy="activation", order="largest"),
                        calibration=cal)
    assert small.channels[0].tolist() != large.channels[0].tolist()
    # GQA: attention not trained by default
    gqa = select_s2ft(tiny_model("llama-gqa"), S2FTConfig(attn_ratio=0.5))
    assert all(g.numel() == 0 for g in gqa.groups)


def test_bad_selection_inputs():
    model = tiny_model("llama-mha")
    with pytest.raises(ValueError, match="exceeds"):
        select_s2ft(model, S2FTConfig(ffn_count=88 * 2 + 1))
    with pytest.raises(ValueError, match="duplicate"):
        make_selection(model, channels={0: [1, 1]})
    with pytest.raises(ValueError, match="outside"):
        make_selection(model, channels={0: [88]})
    with pytest.raises(ValueError, match="outside"):
        make_selection(model, groups={1: [-1]})
    with pytest.raises(ValueError, match="strategy"):
        S2FTConfig(strategy="magic")
    with pytest.raises(ValueError, match="calibration"):
        select_s2ft(model, S2FTConfig(strategy="activation"))
    cfg = transformers.LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=4,
                                   intermediate_size=32, num_hidden_layers=1, vocab_size=10)
    from spft.s2ft import model_shape

    class Fake(torch.nn.Module):
        config = cfg
    with pytest.raises(ValueError, match="not divisible"):
        model_shape(Fake())


def _train(model, steps=3, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 97, (2, 10), generator=g)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("kind", ["llama-mha", "qwen2-gqa"])
def test_adapter_round_trip(kind, tmp_path):
    base = tiny_model(kind)
    model = copy.deepcopy(base)
    sel = select_s2ft(model, S2FTConfig(ffn_ratio=0.2, attn_ratio=0.5, attn_on_gqa=True,
                                        train_qkv=kind == "qwen2-gqa", seed=1))
    prepare_s2ft(model, sel)
    _train(model.train()).eval()
    x = ids()
    with torch.no_grad():
        trained = model(x).logits
        base_logits = base(x).logits
    adapter = export_adapter(model)
    assert set(adapter.entries) == set(s2_modules(model))
    save_adapter(adapter, tmp_path / "a.safetensors")
    loaded = load_adapter(tmp_path / "a.safetensors")
    assert not list(tmp_path.glob(".tmp-*"))
    fresh = copy.deepcopy(base)
    apply_adapter(fresh, loaded)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, trained, atol=1e-5, rtol=1e-5)
    remove_adapter(fresh, loaded)
    for (n, p), q in zip(fresh.state_dict().items(), base.state_dict().values()):
        assert torch.equal(p, q), n
    # restore_original_order gives the same merged model
    restore_original_order(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, trained, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained, base_logits)


def _two_adapters(base, dtype):
    out = []
    for seed in (1, 2):
        m = copy.deepcopy(base).float()
        prepare_s2ft(m, select_s2ft(m, S2FTConfig(ffn_ratio=0.2, attn_ratio=0.25, seed=seed)))
        _train(m.train(), steps=2, seed=seed)
        out.append(export_adapter(m))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fuse_switch_remove(dtype):
    base = tiny_model("llama-mha", dtype)
    a, b = _two_adapters(base, dtype)
    ref_state = copy.deepcopy(base.state_dict())
    x = ids()
    model = copy.deepcopy(base)
    apply_adapter(model, a)
    with torch.no_grad():
        la = model(x).logits
    switch_adapter(model, a, b)
    with torch.no_grad():
        lb = model(x).logits
    switch_adapter(model, b, a)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, la)
    remove_adapter(model, a)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    # fused == applying both
    both = copy.deepcopy(base)
    apply_adapter(both, a)
    apply_adapter(both, b)
    fused = copy.deepcopy(base)
    apply_adapter(fused, fuse_adapters([a, b]))
    tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    for (k, v), w in zip(both.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(v, w, **tol, msg=k)
    # removing out of order subtracts (to rounding)
    remove_adapter(both, a)
    remove_adapter(both, b)
    for k, v in both.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], **({} if dtype == torch.float32 else
                                                       {"atol": 2e-2, "rtol": 2e-2}))
    assert not torch.equal(la, lb)


def test_serve_batched_equals_sequential():
    base = tiny_model("llama-mha")
    a, b = _two_adapters(base, torch.float32)
    x = ids(batch=5, length=7)
    row = torch.tensor([1, -1, 0, 1, 0])
    with torch.no_grad(), serve_adapters(base, [a, b], row):
        served = base(x).logits
    expected = []
    for i, r in enumerate(row.tolist()):
        m = copy.deepcopy(base)
        if r >= 0:
            apply_adapter(m, [a, b][r])
        with torch.no_grad():
            expected.append(m(x[i:i + 1]).logits)
    torch.testing.assert_close(served, torch.cat(expected), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the hooks are gone
        torch.testing.assert_close(base(x).logits, copy.deepcopy(base)(x).logits)


def test_adapter_errors():
    base = tiny_model("llama-mha")
    a, _ = _two_adapters(base, torch.float32)
    model = copy.deepcopy(base)
    prepare_s2ft(model, select_s2ft(model, S2FTConfig(ffn_ratio=0.1)))
    with pytest.raises(TypeError, match="untouched base"):
        apply_adapter(model, a)
    name = next(iter(a.entries))
    e = a.entries[name]
    from spft.s2ft import AdapterEntry
    with pytest.raises(ValueError, match="duplicate"):
        AdapterEntry(e.axis, torch.zeros_like(e.index), e.delta)
    bad = copy.deepcopy(a)
    bad.entries[name].index[0] = 10_000
    with pytest.raises(ValueError, match="outside"):
        apply_adapter(copy.deepcopy(base), bad)
