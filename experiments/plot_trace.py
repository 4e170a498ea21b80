"""Render a compllm trace.json (Chrome trace events) as a timeline PNG: one lane per stream and per query.

    .venv/bin/python experiments/plot_trace.py outputs/<date>/<time>/trace.json [-o timeline.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"load": "#8c8c8c", "evict": "#d62728", "generate": "#1f77b4", "subquery": "#2ca02c",
          "aggregate": "#ff7f0e"}


def lanes(trace: dict) -> tuple[list[str], list[dict]]:
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    keys = sorted({(e["pid"], e["tid"]) for e in spans})
    return [names.get(k, f"{k[0]}/{k[1]}") for k in keys], [dict(e, lane=keys.index((e["pid"], e["tid"])))
                                                           for e in spans]


def plot(trace_path: Path, out: Path) -> Path:
    labels, spans = lanes(json.loads(trace_path.read_text()))
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(labels) + 1.5))
    for e in spans:
        ax.broken_barh([(e["ts"] / 1e6, max(e["dur"] / 1e6, 1e-3))], (e["lane"] - 0.4, 0.8),
                       facecolors=COLORS.get(e.get("cat"), "#9467bd"), edgecolor="white", linewidth=0.5)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since execution started")
    ax.set_title(f"compllm trace: {trace_path}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, COLORS.keys(), loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("-o", "--out", type=Path)
    args = ap.parse_args()
    print(plot(args.trace, args.out or args.trace.with_suffix(".png")))


if __name__ == "__main__":
    main()
