"""CLI: --help, a one-step `spft train`, resume, `spft info`, `spft merge`, and the demo (fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spft.cli import main
from spft.models.tasks import generate_task
from spft.train import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_subprocess():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    out = subprocess.run([sys.executable, "-m", "spft", "--help"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0
    for cmd in ("train", "demo", "merge", "info"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", ["train", "demo", "merge", "info"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: spft " + cmd in capsys.readouterr().out


def test_train_one_step_info_merge_resume(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, generate_task("add", 64))
    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--train", str(data), "--method", "spiel-ag",
            "--density", "0.05", "--max-steps", "1", "--batch-size", "4",
            "--output-dir", str(out), "--no-progress", "--device", "cpu", "--eval-batches", "1"]
    assert main(args) == 0
    assert (out / "adapter.safetensors").exists()
    assert (out / "checkpoint-1").is_dir() and (out / "metrics.png").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and "eval_loss" in rows[0]
    assert "eval loss" in capsys.readouterr().out

    at = args.index("--max-steps") + 1
    assert main([*args[:at], "2", *args[at + 1:], "--resume"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]

    capsys.readouterr()
    assert main(["info", str(out / "adapter.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "spiel-ag" in text and "int32" in text
    assert main(["info", "--json", str(out / "adapter.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "spiel-ag"

    merged = tmp_path / "merged"
    assert main(["merge", "--model", "tiny", "--adapter", str(out / "adapter.safetensors"),
                 "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.hidden_size == 64


def test_errors_are_clean(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert main(["info", str(bad)]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "nowhere"), "--train",
                 str(tmp_path / "x.jsonl")]) == 1


def test_demo_fast_mode(tmp_path, capsys):
    from spft.train.demo import DemoSize, run_demo
    size = DemoSize(hidden=32, layers=2, pretrain_steps=30, finetune_steps=6, batch=8,
                    lora_rank=2)
    results = run_demo(device="cpu", output_dir=str(tmp_path), progress=False, size=size)
    methods = [r["method"] for r in results]
    assert {"spiel-ag", "spiel-ma", "s2ft", "full"} <= set(methods)
    by = {r["method"]: r for r in results}
    assert by["spiel-ag"]["trainable"] == pytest.approx(by["s2ft"]["trainable"], rel=0.1)
    assert (tmp_path / "demo.png").exists() and (tmp_path / "demo.json").exists()
    table = capsys.readouterr().out
    assert "old-task loss" in table and "spiel-ma" in table
