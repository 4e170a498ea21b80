"""task=explain: decompose and route for real, compile, and show what the compiler did and what it will cost."""
from __future__ import annotations

from pathlib import Path

from dataclasses import replace

from omegaconf import DictConfig

from compiler.explain import explain_text
from compiler.render import to_dot, to_mermaid
from compllm.apps.build import build_pipeline
from compllm.apps.inputs import read_queries


def run(cfg: DictConfig, out_dir: Path) -> dict:
    queries = read_queries(cfg)
    pipeline = build_pipeline(cfg)
    pipeline.prepare()
    decompositions = pipeline.decompose(pipeline.context(), queries, [])
    graph = pipeline.build(decompositions, pipeline.route(decompositions))
    pipeline.compiler_config = replace(pipeline.compiler_config, dump=True)
    plan = pipeline.compile(graph)
    text = explain_text(graph, plan)
    files = {
        "explain.txt": text,
        "plan.json": plan.to_json(indent=2),
        "graph.before.dot": to_dot(graph),
        "graph.before.mmd": to_mermaid(graph),
        "graph.after.dot": to_dot(plan.graph),
        "graph.after.mmd": to_mermaid(plan.graph),
    }
    for name, content in files.items():
        (out_dir / name).write_text(content, encoding="utf-8")
    print(text)
    print(f"written to {out_dir}: {', '.join(files)}")
    return {"plan": plan, "graph": graph, "files": sorted(files)}
