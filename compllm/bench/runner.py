"""task=bench: answer a benchmark's items with one system, chunk by chunk, appending each answer to
`results.jsonl` in the run dir the moment its chunk finishes; rerunning the same command resumes."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from compllm.apps.build import build_pipeline
from compllm.bench.items import BenchItem
from compllm.bench.meqa import fanoutqa_item_id
from compllm.bench.scoring import summarize
from compllm.bench.store import ResultsStore

log = logging.getLogger(__name__)
NOT_RESULT_SHAPING = ("task", "show_progress", "cache_dir", "query", "queries_file", "hydra")


def fingerprint(cfg: DictConfig, system: Any = None) -> dict[str, Any]:
    """Every setting that can change this system's answers or timings (a system may name the config groups it
    reads in `depends_on`); the item limit and chunking are not among them."""
    full = OmegaConf.to_container(cfg, resolve=True)
    keys = getattr(system, "depends_on", None)
    return {k: v for k, v in full.items() if k not in NOT_RESULT_SHAPING and (keys is None or k in keys)}


def load_items(cfg: DictConfig, limit: int | None = None) -> list[BenchItem]:
    """The benchmark's items, less the planner's few-shot exemplars (`decomposer.fanoutqa_exemplars`): a system
    is never scored on an item it was shown worked out. `limit` counts what remains."""
    items = list(instantiate(cfg.benchmark.loader))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"benchmark {cfg.benchmark.name!r} has duplicate item ids")
    shown = {fanoutqa_item_id(i) for i in OmegaConf.select(cfg, "decomposer.fanoutqa_exemplars", default=None) or ()}
    if shown & set(ids):
        log.info("benchmark %s: %d item(s) left out, the planner's exemplars (decomposer.fanoutqa_exemplars)",
                 cfg.benchmark.name, len(shown & set(ids)))
        items = [it for it in items if it.id not in shown]
    return items[:limit] if limit is not None else items


def run(cfg: DictConfig, out_dir: Path, *, limit: int | None, chunk_size: int) -> dict[str, Any]:
    """The options come from conf/task/bench.yaml (task.limit=..., task.chunk_size=... on the command line)."""
    from tqdm import tqdm

    items = load_items(cfg, limit)
    system = instantiate(cfg.system)
    store = ResultsStore(out_dir / "results.jsonl", fingerprint(cfg, system))
    todo = [it for it in items if it.id not in store]
    log.info("benchmark %s, system %s: %d items, %d already in %s", cfg.benchmark.name, system.name, len(items),
             len(items) - len(todo), store.path)
    if todo:
        pipeline = build_pipeline(cfg)
        chunk = max(1, int(chunk_size))
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{cfg.benchmark.name}/{system.name}",
                  unit="item", file=sys.stderr, disable=not cfg.show_progress) as bar:
            for start in range(0, len(todo), chunk):
                batch = todo[start: start + chunk]
                answers, trace = system.answer(pipeline, [it.query for it in batch])
                for item, answer in zip(batch, answers):
                    store.append({**item.to_dict(), "system": system.name, "answer": answer.to_dict()})
                if trace is not None:  # open in https://ui.perfetto.dev
                    traces = out_dir / "traces"
                    traces.mkdir(exist_ok=True)
                    (traces / f"{batch[0].id}.json").write_text(json.dumps(trace), encoding="utf-8")
                bar.update(len(batch))
    wanted = {it.id for it in items}
    summary = {"benchmark": cfg.benchmark.name, "system": system.name,
               "models": {a: m["name"] for a, m in OmegaConf.to_container(cfg.models, resolve=True).items()},
               "policy": cfg.policy.name, "results": str(store.path),
               "metrics": summarize(r for r in store if r["id"] in wanted)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary["metrics"], indent=2))
    return summary
