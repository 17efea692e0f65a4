"""LLaMA-style model configs built in code (no download) and loading from a local HF path."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from spft.models.tokenizer import ByteTokenizer


def tiny_llama_config(*, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int | None = None, vocab_size: int = 259,
                      max_position_embeddings: int = 512) -> Any:
    """A `transformers.LlamaConfig` for a tiny decoder (defaults: 2 layers, hidden 64, ~0.1 M
    parameters) matching `ByteTokenizer`'s vocabulary."""
    from transformers import LlamaConfig

    tok = ByteTokenizer()
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or (hidden_size * 8 // 3 + 7) // 8 * 8,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def llama2_7b_config(num_layers: int = 32) -> Any:
    """LLaMA-2-7B dimensions (hidden 4096, FFN 11008, 32 heads, vocab 32000)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=num_layers, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


MODEL_PRESETS = {
    "tiny": lambda: tiny_llama_config(),
    "small": lambda: tiny_llama_config(hidden_size=128, num_layers=4, num_heads=4),
    "llama2-7b": lambda: llama2_7b_config(),
}


def build_model(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> nn.Module:
    """A randomly initialised `LlamaForCausalLM` from `config`, deterministic in `seed`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def load_model_and_tokenizer(spec: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """`spec` is a preset name (see `MODEL_PRESETS`), a local HF model directory, or a local
    `config.json` (random initialisation). Returns (model in train mode, tokenizer); the
    tokenizer is the directory's own when it has one, else a `ByteTokenizer`."""
    if spec in MODEL_PRESETS:
        model = build_model(MODEL_PRESETS[spec](), seed=seed, dtype=dtype, device=device)
        return model.train(), ByteTokenizer()
    if not os.path.exists(spec):
        raise FileNotFoundError(
            f"--model {spec!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a local path")
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isfile(spec):
        config = AutoConfig.from_pretrained(os.path.dirname(spec) or ".")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
        directory = os.path.dirname(spec) or "."
    else:
        directory = spec
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec))
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device)
        else:
            config = AutoConfig.from_pretrained(spec)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    tokenizer: Any
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = ByteTokenizer()
    return model.train(), tokenizer  # from_pretrained returns eval mode; training needs train
