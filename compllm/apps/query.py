"""task=query: answer the queries, print each stage, write result.json."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from compllm.apps.build import build_pipeline
from compllm.apps.inputs import read_queries
from compllm.apps.report import print_result, progress_bar


def run(cfg: DictConfig, out_dir: Path) -> dict:
    queries = read_queries(cfg)
    pipeline = build_pipeline(cfg)
    result, graph = pipeline.run(queries, progress=progress_bar(cfg.show_progress))
    payload = {"config": OmegaConf.to_container(cfg, resolve=True), "ir": graph.dump(), **result.to_dict()}
    trace = payload.pop("trace")
    (out_dir / "result.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "trace.json").write_text(json.dumps(trace), encoding="utf-8")
    print_result(result)
    print(f"\nresult.json: {out_dir / 'result.json'}\ntrace.json (open in https://ui.perfetto.dev): "
          f"{out_dir / 'trace.json'}")
    return payload
