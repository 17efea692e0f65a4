"""The `spft` command line: `spft train`, `spft demo`, `spft merge`, `spft info`.

    spft demo --fast                                  # a minute on CPU, no downloads
    spft train --model tiny --train data.jsonl --method spiel-ag --density 0.01 --max-steps 200 \\
               --output-dir runs/a
    spft train ... --output-dir runs/a --resume       # continue from runs/a's latest checkpoint
    spft info runs/a/adapter.safetensors
    spft merge --model path/to/base --adapter runs/a/adapter.safetensors --out merged/
"""

from __future__ import annotations

import argparse
import sys

METHOD_CHOICES = ("spiel-ag", "spiel-ma", "s2ft", "full", "lora")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny",
                   help="preset (tiny, small, llama2-7b), a local HF model directory, or a "
                        "local config.json (random init) [tiny]")
    g.add_argument("--train", required=True, metavar="JSONL",
                   help="training data: one JSON object per line with 'text', or 'prompt' and "
                        "'completion' (loss on the completion only)")
    g.add_argument("--eval", metavar="JSONL", help="held-out data (default: --eval-fraction of "
                                                   "--train)")
    g.add_argument("--eval-fraction", type=float, default=0.05,
                   help="fraction of --train held out when --eval is absent [0.05]")
    g.add_argument("--max-length", type=int, default=256)
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHOD_CHOICES, default="spiel-ag")
    g.add_argument("--density", type=float, default=None,
                   help="fraction of each target weight that is trainable [0.01]")
    g.add_argument("--num-trainable", type=int, default=None,
                   help="total trainable budget spread over the target layers (overrides "
                        "--density)")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                                               "down_proj")
    g.add_argument("--quant", choices=("nf4",), default=None,
                   help="store the frozen base in NF4 (qSpIEL)")
    g.add_argument("--merged", action="store_true",
                   help="SpIEL: keep the deltas merged in the 16-bit weight (plain GEMM "
                        "forward; the optimizer refreshes W[idx] after each step)")
    g.add_argument("--reselect-every", type=int, default=20,
                   help="SpIEL drop-and-grow period in steps (0: fixed indices) [20]")
    g.add_argument("--drop-fraction", type=float, default=0.1)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("auto", "adamw", "sm3"), default="auto",
                   help="auto: SM3 for spiel-ma (its growth reads SM3's accumulators), else "
                        "AdamW [auto]")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="linear")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping [1.0]")
    g.add_argument("--bf16", action="store_true", help="bfloat16 base weights")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cuda or cpu [cuda when available]")
    g.add_argument("--output-dir", default=None,
                   help="metrics.jsonl, metrics.png, checkpoints and adapter.safetensors")
    g.add_argument("--eval-every", type=int, default=0, help="0: at the end only")
    g.add_argument("--eval-batches", type=int, default=8)
    g.add_argument("--save-every", type=int, default=0, help="0: at the end only")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from a checkpoint directory (default: --output-dir's latest)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-plot", action="store_true")


def _device(arg: str | None) -> str:
    import torch
    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from spft.models import load_model_and_tokenizer
    from spft.train import TokenizedDataset, TrainConfig, Trainer, read_jsonl

    density = args.density if args.density is not None else (
        None if args.num_trainable else 0.01)
    cfg = TrainConfig(
        method=args.method, target_modules=tuple(args.target_modules.split(",")),
        density=density, num_trainable=args.num_trainable, lora_rank=args.lora_rank,
        quant=args.quant, merged=args.merged, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        grad_clip=args.grad_clip or None, bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every,
        reselect_every=args.reselect_every, drop_fraction=args.drop_fraction, seed=args.seed,
        output_dir=args.output_dir, progress=not args.no_progress, plot=not args.no_plot)
    resume = None
    if args.resume is not None:
        resume = args.resume or args.output_dir
        if not resume:
            print("spft train: --resume needs a checkpoint path or --output-dir", file=sys.stderr)
            return 2
    device = _device(args.device)
    model, tokenizer = load_model_and_tokenizer(
        args.model, seed=args.seed, device=device,
        dtype=torch.bfloat16 if args.bf16 else torch.float32)
    records = read_jsonl(args.train)
    if args.eval:
        eval_records = read_jsonl(args.eval)
    elif args.eval_fraction > 0 and len(records) >= 20:
        cut = max(1, int(len(records) * args.eval_fraction))
        records, eval_records = records[cut:], records[:cut]
    else:
        eval_records = None
    train_data = TokenizedDataset(records, tokenizer, max_length=cfg.max_length, seed=cfg.seed)
    eval_data = (TokenizedDataset(eval_records, tokenizer, max_length=cfg.max_length)
                 if eval_records else None)
    trainer = Trainer(model, cfg, train_data=train_data, eval_data=eval_data)
    print(f"spft train: {cfg.method} on {args.model} ({device}), "
          f"{trainer.num_trainable:,} trainable parameters, {len(train_data)} examples",
          file=sys.stderr)
    rows = trainer.train(resume_from=resume)
    last = rows[-1] if rows else {}
    summary = f"step {trainer.step}: loss {last.get('loss', float('nan')):.4f}"
    if "eval_loss" in last:
        summary += f", eval loss {last['eval_loss']:.4f} (ppl {last['eval_ppl']:.2f})"
    print(summary)
    if args.output_dir:
        print(f"adapter: {args.output_dir}/adapter.safetensors")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from spft.train.demo import run_demo
    run_demo(fast=args.fast, device=_device(args.device), output_dir=args.output_dir,
             methods=tuple(args.methods.split(",")) if args.methods else None,
             progress=not args.no_progress)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from spft.adapters import merge_adapter
    from spft.models import load_model_and_tokenizer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model, tokenizer = load_model_and_tokenizer(args.model, seed=args.seed)
    model = merge_adapter(model, args.adapter, dtype=dtype)
    model.save_pretrained(args.out)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out} ({args.dtype})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from spft.adapters import adapter_info, format_info

    info = adapter_info(args.adapter)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spft", description="Sparse fine-tuning (SpIEL, S2FT) "
                                     "of causal LMs: train, compare with LoRA, ship adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune a model on JSONL data")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="pre-train a tiny model, fine-tune it with every method, "
                                    "compare (no downloads)")
    p.add_argument("--fast", action="store_true", help="smaller and shorter (< 1 min on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--output-dir", default="spft-demo")
    p.add_argument("--methods", default=None, help="comma-separated subset of "
                                                  + ",".join(METHOD_CHOICES))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("merge", help="fold an adapter into its base; write a 16-bit HF model")
    p.add_argument("--model", required=True, help="the base (preset or local HF directory)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset base [0]")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("info", help="print what an adapter file holds")
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spft.adapters import AdapterError
    try:
        return args.func(args)
    except (AdapterError, NotImplementedError, FileNotFoundError) as e:
        print(f"spft {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
