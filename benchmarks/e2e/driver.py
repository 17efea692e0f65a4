"""Run every end-to-end configuration in its own process, print the table, write a plot.

    python benchmarks/e2e/driver.py --layers 32 --outdir out/    # H100: ~5-7 minutes

Prints a markdown table (ms/step, peak GiB, trainable, ratios to LoRA / QLoRA) and the
issue's targets: S2FT ≤ 0.7× LoRA time at ≤ LoRA memory; SpIEL-AG ≤ 0.9× LoRA time at ≤ 1.05×
its memory; qSpIEL memory ≤ QLoRA's at ≤ 0.75× QLoRA's time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ("full", "lora", "qlora", "spiel-ag", "spiel-ag-lean", "spiel-ma", "qspiel", "qspiel-ma",
         "s2ft")
LABELS = {"full": "full FT (AdamW)", "lora": "LoRA r=64", "qlora": "QLoRA r=64 (bnb NF4+DQ)",
          "spiel-ag": "SpIEL-AG (merged, AdamW)",
          "spiel-ag-lean": "SpIEL-AG (merged, AdamW bf16 moments, 1× candidates)",
          "spiel-ma": "SpIEL-MA (merged, SM3)",
          "qspiel": "qSpIEL-AG (spft NF4+DQ, AdamW)",
          "qspiel-ma": "qSpIEL-MA (spft NF4+DQ, SM3)", "s2ft": "S2FT (down_proj channels, AdamW)"}


def run_all(configs, layers: int, outdir: str, timeout: int,
            extra: tuple[str, ...] = ()) -> dict[str, dict]:
    results = {}
    for name in configs:
        path = os.path.join(outdir, f"e2e-{name}.json")
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, os.path.join(HERE, "run_config.py"), name,
                                   "--layers", str(layers), "--out", path, *extra],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"# {name}: timed out after {timeout}s", flush=True)
            continue
        if proc.returncode != 0 or not os.path.exists(path):
            print(f"# {name}: failed (rc {proc.returncode})\n{proc.stderr[-2500:]}", flush=True)
            continue
        with open(path) as f:
            results[name] = json.load(f)
        r = results[name]
        print(f"# {name}: {r['ms_per_step']:.0f} ms/step, {r['peak_gib']:.1f} GiB "
              f"({time.time() - t0:.0f} s)", flush=True)
    return results


def _ratio(r: dict, ref: dict | None, key: str) -> str:
    return f"{r[key] / ref[key]:.2f}" if ref and ref[key] else "-"


def table(results: dict[str, dict]) -> str:
    lora, qlora = results.get("lora"), results.get("qlora")
    lines = ["| configuration | ms / step | peak GiB | weights resident GiB | trainable | "
             "time / LoRA | mem / LoRA |", "|---|---|---|---|---|---|---|"]
    for name in ORDER:
        r = results.get(name)
        if r is None:
            continue
        quant = name.startswith("qspiel") and qlora is not None
        ref = qlora if quant else lora
        rt = _ratio(r, ref, "ms_per_step")
        rm = _ratio(r, ref, "peak_gib")
        if quant:
            rt, rm = rt + " (vs QLoRA)", rm + " (vs QLoRA)"
        extra = ""
        if "reselect_ms" in r:
            extra = f" (steady {r['steady_ms']:.0f}"
            if r["find_ms"] != r["steady_ms"]:
                extra += f", find {r['find_ms']:.0f}, accumulate {r['accumulate_ms']:.0f}"
            extra += f", reselection {r['reselect_ms']:.0f} ms)"
        peak = f"{r['peak_gib']:.1f}"
        if "steady_peak_gib" in r:
            peak += f" (steady {r['steady_peak_gib']:.1f})"
        lines.append(f"| {LABELS[name]} | {r['ms_per_step']:.0f}{extra} | {peak} | "
                     f"{r['resident_gib']:.1f} | {r['trainable'] / 1e6:,.1f} M | {rt} | {rm} |")
    return "\n".join(lines)


def targets(results: dict[str, dict]) -> list[str]:
    out = []
    lora, qlora = results.get("lora"), results.get("qlora")

    def check(name, ref, t_max, m_max, refname):
        r = results.get(name)
        if r is None or ref is None:
            out.append(f"- {name}: not measured")
            return
        if not ref["ms_per_step"] or not ref["peak_gib"]:
            out.append(f"- {name}: reference {refname} has no timing/memory (CPU run?)")
            return
        t, m = r["ms_per_step"] / ref["ms_per_step"], r["peak_gib"] / ref["peak_gib"]
        ok = t <= t_max and m <= m_max
        out.append(f"- {name}: time {t:.2f}× {refname} (target ≤ {t_max}), memory {m:.2f}× "
                   f"(target ≤ {m_max}) → {'MET' if ok else 'NOT MET'}")
    check("s2ft", lora, 0.7, 1.0, "LoRA")
    check("spiel-ag", lora, 0.9, 1.05, "LoRA")
    check("qspiel", qlora, 0.75, 1.0, "QLoRA")
    check("qspiel-ma", qlora, 0.75, 1.0, "QLoRA")
    return out


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in ORDER if n in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colors = ["#888" if n in ("full", "lora", "qlora") else "#1f77b4" for n in names]
    axes[0].barh(names, [results[n]["ms_per_step"] for n in names], color=colors)
    axes[0].set_xlabel("ms per optimizer step (lower is better)")
    axes[1].barh(names, [results[n]["peak_gib"] for n in names], color=colors)
    axes[1].set_xlabel("peak GPU memory, GiB (lower is better)")
    for ax in axes:
        ax.invert_yaxis()
    dev = next(iter(results.values()))["device"]
    fig.suptitle(f"LLaMA-2-7B shape, batch 4×1024, bf16, activation checkpointing — {dev}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--configs", default=",".join(ORDER))
    ap.add_argument("--outdir", default=".")
    ap.add_argument("--timeout", type=int, default=150, help="per configuration, seconds")
    ap.add_argument("--tiny", action="store_true", help="smoke test with tiny dimensions")
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    results = run_all(args.configs.split(","), args.layers, args.outdir, args.timeout,
                      ("--tiny", "--seq", "64", "--lora-rank", "4") if args.tiny else ())
    print(table(results))
    print("\n".join(targets(results)))
    with open(os.path.join(args.outdir, "e2e.json"), "w") as f:
        json.dump(results, f, indent=1)
    if results:
        plot(results, os.path.join(args.outdir, "e2e.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
