"""task=calibrate: measure every configured model on this machine again (timings and memory); later runs use the
numbers. Noisy measurements are refused, as in automatic calibration: the reason is printed and nothing is stored.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from compllm.apps.build import build_pipeline
from compllm.calibration import CalibrationStore, Protocol, calibrate, describe, measure_base_bytes
from compllm.calibration.build import import_model_code

GIB, MIB = 2**30, 2**20


def run(cfg: DictConfig, out_dir: Path, *, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """The options come from conf/task/calibrate.yaml (task.prompt_tokens=... on the command line)."""
    pipeline = build_pipeline(cfg)
    # asked for explicitly: wait longer for quiet rounds than a run's automatic calibration does
    protocol = Protocol(prompt_tokens=prompt_tokens, decode_steps=new_tokens, min_rounds=repeats, max_seconds=300.0)
    store = CalibrationStore(cfg.cache_dir)
    payload: dict = {}  # key -> the measured costs (also when not stored), "stored", "note"
    remote = [a for a in pipeline.model_aliases() if pipeline.pool.spec(a).get("backend") == "openai"]
    for alias in remote:
        payload.update(calibrate_server(pipeline.pool, alias, store, prompt_tokens, new_tokens, repeats))
    infos = [describe(pipeline.pool, alias) for alias in pipeline.model_aliases() if alias not in remote]
    for info in infos:
        import_model_code(info)
    base = measure_base_bytes(pipeline.pool, infos)
    print(f"base: {base / GIB:.2f} GiB resident before any model loads (imports; the router's embedder not loaded)")
    for info in dict((i.key, i) for i in infos).values():
        result = calibrate(pipeline.pool, info, store, protocol, progress=cfg.show_progress, force=True)
        cost, verdict = result.measured or result.cost, result.verdict
        steps = ", ".join(f"{b}: {s * 1e3:.1f}" for b, s in (cost.decode_step_s_by_batch or {}).items()) or "n/a"
        print(f"{info.alias} ({info.key}): {'stored' if result.stored else 'NOT stored: ' + result.note}\n"
              f"  memory ({'measured' if result.memory_measured else 'estimated'}): weights {cost.weight_bytes / GIB:.2f}"
              f" GiB (with tokenizer), load transient {cost.load_extra_bytes / MIB:.0f} MiB, KV "
              f"{cost.kv_bytes_per_token / 1024:.1f} KiB/token, prefill workspace "
              f"{cost.workspace_bytes_per_token / 1024:.1f} KiB/token\n"
              f"  time{'' if result.stored else ' (as measured, noisy)'}: prefill {cost.prefill_s_per_token * 1e3:.2f}"
              f" ms/token, decode step by batch (ms) {steps}, load {cost.load_s or 0:.1f} s")
        if verdict is not None:
            others = "n/a" if verdict.others_cpu is None else f"{verdict.others_cpu:.0%}"
            print(f"  measured in {verdict.seconds:.0f} s: {verdict.rounds} rounds ({verdict.clean_rounds} quiet), "
                  f"spread {verdict.spread:.2f}x, other processes' CPU share up to {others}")
        payload[info.key] = {**asdict(cost), "stored": result.stored, "note": result.note}
    (out_dir / "calibration.json").write_text(json.dumps({"base_bytes": base, "models": payload}, indent=2),
                                              encoding="utf-8")
    print(f"calibration file: {store.path}")
    return payload


def calibrate_server(pool, alias: str, store: CalibrationStore, prompt_tokens: int, new_tokens: int,
                     repeats: int) -> dict:
    """Measure a served model from this client (`compllm.calibration.remote`) and store it under its URL."""
    from compllm.calibration.build import remote_key
    from compllm.calibration.remote import calibrate_remote

    spec = pool.spec(alias)
    key = remote_key(spec)
    model = pool.get(alias)
    result = calibrate_remote(getattr(model, "inner", model), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                              repeats=repeats)
    cost = result.cost
    with store.lock():
        store.save(key, cost, rounds=repeats, memory="remote: none local")
    steps = ", ".join(f"{c}: {s * 1e3:.1f}" for c, s in cost.decode_step_s_by_batch.items())
    walls = ", ".join(f"{c}: {s:.2f}" for c, s in result.latency_s_by_concurrency.items())
    print(f"{alias} ({key}): stored\n  served at {spec['server']['base_url']}: no local memory; concurrency budget "
          f"{spec['server'].get('max_concurrency', 8)}\n  time seen from the client: prefill "
          f"{cost.prefill_s_per_token * 1e3:.2f} ms/token, request overhead {cost.call_overhead_s * 1e3:.0f} ms, "
          f"decode ms/token by requests in flight {{{steps}}}\n  latency s of that many requests at once {{{walls}}}")
    return {key: {**asdict(cost), "latency_s_by_concurrency": result.latency_s_by_concurrency, "stored": True,
                  "note": "remote"}}
