"""Human-facing output of a run: what was split, who answered, what they said, and the final answer."""
from __future__ import annotations

import sys
import textwrap

from compiler.build import node_id
from compllm.runtime.result import RunResult


def progress_bar(enabled: bool):
    """A factory for the executor's per-node bar (its total is known only after decomposition)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda total: tqdm(total=total, desc="executing", unit="node", file=sys.stderr, leave=False)


def _wrap(text: str, indent: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=100, initial_indent=indent, subsequent_indent=indent)


def print_result(result: RunResult) -> None:
    for q in result.queries:
        d = q.decomposition
        print(f"\n=== {q.id}: {q.query}")
        how = "fallback: single sub-query (" + d["reason"][:120] + ")" if d["fallback"] else f"parsed as {d['format']}"
        print(f"--- decomposition ({len(d['subqueries'])} sub-queries, {how})")
        for sq in d["subqueries"]:
            deps = f"  depends on {', '.join('#%d' % x for x in sq['depends_on'])}" if sq["depends_on"] else ""
            print(f"  #{sq['index']} [{sq['expert']} {sq['route_score']:.2f}{' fallback' if sq['routed_by'] != 'router' else ''}]"
                  f" {sq['text']}{deps}")
        for w in d["warnings"]:
            print(f"  warning: {w}")
        print("--- sub-answers")
        nodes = {n.node_id: n for n in q.nodes}
        for sq in d["subqueries"]:
            node = nodes.get(node_id(q.id, sq["index"]))
            if node is None:
                continue
            body = node.answer if node.ok else f"({node.status}: {node.error})"
            print(f"  #{sq['index']} ({node.expert}, {node.output_tokens} tok, {node.end - node.start:.1f}s):")
            if node.escalated is not None:  # a cascade's escalate node: which model's answer this is, and why
                print(f"      [cascade on {node.model}] {node.note}")
            print(_wrap(body, "      "))
        print("--- final answer" + (" (partial)" if q.partial else ""))
        for line in q.final_answer.splitlines():
            print(_wrap(line, "  "))
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    print(f"\npolicy={result.policy}  {stages}")
    for alias, m in result.models.items():
        print(f"model {alias}: {m['name']} (load {m['load_seconds']:.1f}s, {m['calls']} calls, "
              f"{m['prompt_tokens']} prompt + {m['output_tokens']} output tokens)")
    mem = result.memory
    if mem:
        planned = f", planned {mem['planned_peak_bytes'] / 2**30:.2f} GiB" if mem.get("planned_peak_bytes") else ""
        budget = f", budget {mem['budget_bytes'] / 2**30:.2f} GiB" if mem.get("budget_bytes") else ""
        print(f"memory: measured peak {mem['measured_peak_bytes'] / 2**30:.2f} GiB{planned}{budget}")
    for e in result.errors:
        print(f"error: {e}")
    names = sorted({m["name"] for m in result.models.values()})
    if names:
        print(f"note: answered by {', '.join(names)}; small models state wrong facts with confidence, so check an "
              "answer before relying on it (accuracy is measured in the README's Experiments section)")
