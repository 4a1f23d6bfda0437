"""Plot benchmark rows: one PNG per ``benchmarks/results/<bench>.jsonl``, speed-up over the reference per provider.

For each (shape, variant) group the latest run's rows are drawn as grouped bars (log scale). Needs matplotlib;
without it the script says so and exits non-zero.

    python benchmarks/plot.py [--results benchmarks/results] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return []
    # Keep only the latest run per device (rows of one run share a timestamp to the second or so).
    latest: dict[str, str] = {}
    for r in rows:
        latest[r.get("device", "")] = max(latest.get(r.get("device", ""), ""), r.get("timestamp", ""))
    last_day = {dev: ts[:16] for dev, ts in latest.items()}
    return [r for r in rows if r.get("timestamp", "")[:16] == last_day[r.get("device", "")]]


def plot(path: Path, out_dir: Path, plt) -> Path | None:
    rows = load(path)
    if not rows:
        return None
    variant_key = "pattern" if "pattern" in rows[0] else "dtype"
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        groups[f"{r['shape']}\n{r.get(variant_key, '')}"][r["provider"]] = r["speedup_vs_reference"]
    providers = sorted({p for g in groups.values() for p in g}, key=lambda p: (p != "reference", p))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(providers)
    for k, prov in enumerate(providers):
        xs = [i + k * width for i in range(len(groups))]
        ax.bar(xs, [g.get(prov, 0.0) for g in groups.values()], width, label=prov)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], list(groups), fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up over reference (p50)")
    ax.set_title(f"{path.stem} on {rows[0].get('device', '?')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = out_dir / f"{path.stem}.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(results: Path = RESULTS_DIR, out: Path = RESULTS_DIR) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib (pip install matplotlib); the JSONL rows in "
              f"{results} are readable as they are.", file=sys.stderr)
        return 1
    files = sorted(results.glob("*.jsonl"))
    if not files:
        print(f"no *.jsonl files in {results}; run a benchmark first", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        png = plot(f, out, plt)
        print(f"{f.name}: {png if png else 'no rows'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    sys.exit(main(args.results, args.out))
