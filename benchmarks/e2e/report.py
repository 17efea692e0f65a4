"""Rebuild the table, target checks and plot from saved per-configuration JSON files.

    python benchmarks/e2e/report.py benchmarks/e2e/results --png docs/e2e.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from driver import plot, table, targets


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    results = {}
    for path in sorted(glob.glob(os.path.join(args.folder, "e2e-*.json"))):
        with open(path) as f:
            r = json.load(f)
        results[r["config"]] = r
    print(table(results))
    print("\n".join(targets(results)))
    if args.png and results:
        plot(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
