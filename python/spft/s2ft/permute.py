"""Co-permutation of LLaMA-family blocks and conversion to S2FT modules.

    plan = prepare_s2ft(model, selection)   # permutes in place, wraps S2Linear, freezes the rest

Per block (the model computes the same function afterwards):
* FFN: one permutation ``p`` of the intermediate channels (selected first, then the rest, both
  ascending) on gate/up output rows and down input columns.
* Attention: a permutation of KV groups (selected first); query heads move with their group.
  Q rows, K/V rows and O columns move as whole heads (RoPE acts within a head, so it commutes).
Trainable slices become `spft.nn.S2Linear` (down/o: input axis; gate/up/q/k/v: output axis, per
`S2FTConfig`); every other parameter gets ``requires_grad=False``.

`S2FTPlan` stores each block's permutations (``ffn_perm[i][j]`` = original channel at permuted
position j; ``group_perm[i]`` likewise for KV groups) and, per wrapped module name, its axis and
original indices. `restore_original_order(model, plan)` undoes everything: plain nn.Linear layers
in original coordinates holding the (trained) weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spft.nn._targets import replace_submodule
from spft.nn.s2_linear import S2Linear
from spft.s2ft.selection import S2Selection, decoder_layers, model_shape


@dataclass
class S2FTPlan:
    ffn_perm: list[Tensor]
    group_perm: list[Tensor]
    n_rep: int
    head_dim: int
    modules: dict[str, tuple[str, Tensor]] = field(default_factory=dict)


def _full_perm(selected: Tensor, n: int) -> Tensor:
    rest = torch.ones(n, dtype=torch.bool)
    rest[selected] = False
    return torch.cat([selected, rest.nonzero().flatten()])


def head_rows(group_perm: Tensor, n_rep: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Row orders for Q ([n_heads·hd]) and K/V ([n_kv·hd]) under a KV-group permutation."""
    ar = torch.arange(head_dim)
    q_heads = (group_perm[:, None] * n_rep + torch.arange(n_rep)[None, :]).flatten()
    q = (q_heads[:, None] * head_dim + ar).flatten()
    kv = (group_perm[:, None] * head_dim + ar).flatten()
    return q, kv


@torch.no_grad()
def _permute_(linear: nn.Module, perm: Tensor, dim: int) -> None:
    w = linear.weight
    perm = perm.to(w.device)
    w.copy_(w.index_select(dim, perm))
    if dim == 0 and getattr(linear, "bias", None) is not None:
        linear.bias.copy_(linear.bias.index_select(0, perm))


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def permute_block_(layer: nn.Module, ffn_perm: Tensor | None, group_perm: Tensor | None,
                   n_rep: int, head_dim: int) -> None:
    """Apply the co-permutations to one decoder block in place."""
    if ffn_perm is not None:
        mlp = layer.mlp
        _permute_(mlp.gate_proj, ffn_perm, 0)
        _permute_(mlp.up_proj, ffn_perm, 0)
        _permute_(mlp.down_proj, ffn_perm, 1)
    if group_perm is not None:
        attn = layer.self_attn
        q, kv = head_rows(group_perm, n_rep, head_dim)
        _permute_(attn.q_proj, q, 0)
        _permute_(attn.k_proj, kv, 0)
        _permute_(attn.v_proj, kv, 0)
        _permute_(attn.o_proj, q, 1)


def _wrap(parent: nn.Module, attr: str, s: int, axis: str, index: Tensor, plan: S2FTPlan,
          name: str) -> None:
    if s == 0:
        return
    lin = getattr(parent, attr)
    setattr(parent, attr, S2Linear.from_linear(lin, s, axis, index))
    plan.modules[name] = (axis, index.clone())


def prepare_s2ft(model: nn.Module, selection: S2Selection) -> S2FTPlan:
    """Co-permute every block of `model` in place, wrap the trainable slices in `S2Linear`,
    freeze all other parameters, and return the plan (also stored as ``model.s2ft_plan``)."""
    shape = model_shape(model)
    if selection.n_rep != shape.n_rep or selection.head_dim != shape.head_dim or \
            len(selection.channels) != shape.n_layers:
        raise ValueError("selection does not match this model's shape")
    cfg = selection.config
    for p in model.parameters():
        p.requires_grad_(False)
    plan = S2FTPlan([], [], shape.n_rep, shape.head_dim)
    prefix = "model.layers" if hasattr(model, "model") else "layers"
    for i, layer in enumerate(decoder_layers(model)):
        ch, gr = selection.channels[i], selection.groups[i]
        fp = _full_perm(ch, shape.intermediate)
        gp = _full_perm(gr, shape.n_kv_heads)
        permute_block_(layer, fp, gp, shape.n_rep, shape.head_dim)
        plan.ffn_perm.append(fp)
        plan.group_perm.append(gp)
        q, kv = head_rows(gp, shape.n_rep, shape.head_dim)
        n_ch, n_q, n_kv = ch.numel(), gr.numel() * shape.n_rep * shape.head_dim, \
            gr.numel() * shape.head_dim
        mlp, attn = layer.mlp, layer.self_attn
        base = f"{prefix}.{i}"
        if cfg.train_down:
            _wrap(mlp, "down_proj", n_ch, "input", fp[:n_ch], plan, f"{base}.mlp.down_proj")
        if cfg.train_gate_up:
            for a in ("gate_proj", "up_proj"):
                _wrap(mlp, a, n_ch, "output", fp[:n_ch], plan, f"{base}.mlp.{a}")
        if cfg.train_o:
            _wrap(attn, "o_proj", n_q, "input", q[:n_q], plan, f"{base}.self_attn.o_proj")
        if cfg.train_qkv:
            _wrap(attn, "q_proj", n_q, "output", q[:n_q], plan, f"{base}.self_attn.q_proj")
            for a in ("k_proj", "v_proj"):
                _wrap(attn, a, n_kv, "output", kv[:n_kv], plan, f"{base}.self_attn.{a}")
    model.s2ft_plan = plan
    return plan


def s2_modules(model: nn.Module) -> dict[str, S2Linear]:
    """Name → S2Linear for every S2FT module of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, S2Linear)}


@torch.no_grad()
def restore_original_order(model: nn.Module, plan: S2FTPlan | None = None) -> nn.Module:
    """Undo `prepare_s2ft` in place: S2Linear → nn.Linear (current weights), inverse
    permutations, original coordinates. Trainability flags are left as they are."""
    plan = plan or model.s2ft_plan
    for name, mod in s2_modules(model).items():
        replace_submodule(model, name, mod.to_linear())
    for i, layer in enumerate(decoder_layers(model)):
        permute_block_(layer, _inverse(plan.ffn_perm[i]), _inverse(plan.group_perm[i]),
                       plan.n_rep, plan.head_dim)
    if hasattr(model, "s2ft_plan"):
        del model.s2ft_plan
    return model
