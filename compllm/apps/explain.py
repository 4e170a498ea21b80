"""task=explain: decompose and route for real, compile, and show what the compiler did and what it will cost."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from compiler import CompilerConfig, compile
from compiler.explain import explain_text
from compiler.render import to_dot, to_mermaid
from compllm.apps.build import build_pipeline
from compllm.apps.inputs import read_queries
from compllm.costing import build_cost_model


def compiler_config(cfg: DictConfig, **overrides) -> CompilerConfig:
    fields = OmegaConf.to_container(cfg.compiler, resolve=True)
    fields.update(overrides)
    return CompilerConfig(**fields)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    queries = read_queries(cfg)
    pipeline = build_pipeline(cfg)
    pipeline.prepare()
    decompositions = pipeline.decompose(queries)
    graph = pipeline.build(decompositions, pipeline.route(decompositions))
    cost = build_cost_model(pipeline.pool, pipeline.experts, pipeline.aggregator.model, cfg.cache_dir)
    plan = compile(graph, cost, compiler_config(cfg, dump=True))
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
