"""The cost model for a run: each model's stored calibration, else a fresh one (once per machine), else estimates.

`build_cost_model` is called once per process, after the router is fitted and before the LLMs load, so that
`base_bytes` is what the process holds without them, and a model calibrated now is loaded inside a measured
window (its real resident bytes and load transient). A model already loaded still gets timings measured, with
memory estimated from its files (`facts.estimated_cost`).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

from compiler.cost import CostModel, ModelCost
from compllm.calibration.facts import ModelFacts, estimated_cost, model_facts
from compllm.calibration.measure import PREFILL, Probe, Protocol, Verdict, run_rounds, step_key, step_table
from compllm.calibration.probe import HFProbe
from compllm.calibration.store import CalibrationStore, Entry
from compllm.runtime.memory import PeakWindow, current_rss_bytes, release_free_heap

log = logging.getLogger(__name__)

SKIP_HINT = "auto_calibrate=false skips calibration"


def calibration_key(name: str, device: str, dtype: str, kernel: str) -> str:
    """Timings hold for one model on one device kind, dtype and decode kernel (a changed kernel re-measures)."""
    return f"{name}|{device.split(':')[0]}|{dtype}|{kernel}"


def loaded_key(model) -> str:
    """The key of a loaded hf model."""
    kernel = "weight-major" if getattr(model, "skinny_linears", 0) else "torch"
    return calibration_key(model.name, model.device, model.dtype, kernel)


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a configured model alias without loading it."""

    alias: str
    key: str
    device: str
    dtype: str
    directory: str | None  # the converted local HF directory, when the source is one
    facts: ModelFacts | None  # None when the source is not a local directory (a hub repo id)


def describe(pool, alias: str) -> ModelInfo:
    """Resolve an alias's device, dtype, key and files (materializing the source, which converts it once)."""
    from pathlib import Path

    from hydra.utils import instantiate

    from compllm.backends.hf import resolve_device, resolve_dtype
    from compllm.backends.pool import CACHE_DTYPE

    spec = pool.spec(alias)
    device = resolve_device(spec.get("device", "auto"))
    dtype = resolve_dtype(spec.get("dtype", "auto"), device)
    kernel = "weight-major" if spec.get("decode_matmul", "auto") == "auto" and device == "cpu" else "torch"
    resolved = instantiate(spec["source"]).materialize(cache_dir=pool.cache_dir, dtype=CACHE_DTYPE)
    directory = resolved.path if not resolved.gguf_file and Path(resolved.path).is_dir() else None
    facts = None
    if directory:
        try:
            facts = model_facts(directory)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cannot read the shape of %s from %s (%s); its costs come from the loaded model", alias,
                        directory, exc)
    return ModelInfo(alias, calibration_key(spec.get("name", alias), device, dtype, kernel), device, dtype,
                     directory, facts)


@dataclass
class Calibration:
    """One model's calibration outcome: the cost to use this run, whether it was stored, and what was measured
    (also when refused: `task=calibrate` shows it)."""

    alias: str
    key: str
    cost: ModelCost
    stored: bool
    verdict: Verdict | None = None
    memory_measured: bool = False
    note: str = ""
    measured: ModelCost | None = None


def _backend(pool, alias: str):
    model = pool.get(alias)
    return getattr(model, "inner", model)  # a fault-injection wrapper times the real model underneath


def _estimate(pool, info: ModelInfo) -> ModelCost:
    if info.facts is not None:
        return estimated_cost(info.facts, info.dtype, info.device)
    return estimated_cost(facts_of_loaded(_backend(pool, info.alias)), info.dtype, info.device)


def facts_of_loaded(model) -> ModelFacts:
    """Facts of a loaded hf model (for sources without a local directory)."""
    cfg = model.model.config
    heads = cfg.num_attention_heads
    return ModelFacts(
        params=sum(p.numel() for p in model.model.parameters()),
        largest_tensor_file_bytes=max(p.numel() * p.element_size() for p in model.model.parameters()),
        layers=cfg.num_hidden_layers,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
        tokenizer_file_bytes=0,
    )


def _name(info: ModelInfo) -> str:
    return info.key.split("|")[0]


def _progress_bar(progress: bool, name: str, protocol: Protocol, loading: bool):
    """Counts measurements (one round: a prefill and a decode step per batch size), so tqdm's ETA follows."""
    from tqdm.auto import tqdm

    per_round = len(protocol.quantities())
    total = (protocol.min_rounds + protocol.warmup) * per_round + 1  # + the workspace prefill
    return tqdm(total=total, desc=f"calibrating {name}" + (": loading weights" if loading else ""),
                unit="measurement", disable=not progress, leave=False, dynamic_ncols=True)


def calibrate(pool, info: ModelInfo, store: CalibrationStore, protocol: Protocol | None = None,
              progress: bool = True, force: bool = False, probe_of: Callable[[object], Probe] = HFProbe) -> Calibration:
    """Measure one model under the machine-wide calibration lock and store it if the numbers are good.

    Another process that held the lock may have measured it meanwhile: then its entry is used (unless `force`).
    Refused (noisy) measurements are not stored: this run uses the previous timings or the estimate, with the
    memory measured now; the next run tries again."""
    protocol = protocol or Protocol()
    estimate = _estimate(pool, info) if info.facts is not None else None
    with store.lock() as locked:
        if not locked:
            log.warning("not calibrating %s this run: estimates are used; the next run tries again", info.key)
            cost = estimate or _estimate(pool, info)
            return Calibration(info.alias, info.key, cost, False, note="calibration lock not acquired")
        if not force and (entry := store.get(info.key)) is not None:
            log.info("using the calibration of %s that another process just stored", info.key)
            return Calibration(info.alias, info.key, entry.cost, True, note="measured by another process")
        log.info("calibrating %s on this machine, once (%s)", info.key, SKIP_HINT)
        loading = info.alias not in pool.loaded()
        bar = _progress_bar(progress, _name(info), protocol, loading)
        try:
            load_window = None
            if loading:
                import_model_code(info)  # code is base, not the model's resident bytes
                gc.collect()
                release_free_heap()
                with PeakWindow(device=info.device) as load_window:
                    model = _backend(pool, info.alias)
                bar.set_description(f"calibrating {_name(info)}")
            else:
                model = _backend(pool, info.alias)
            probe = probe_of(model)

            def tick(what: str, done: bool) -> None:
                if done:
                    bar.update(1)
                else:
                    bar.set_postfix_str(f"prefill of {protocol.prompt_tokens} tokens" if what == PREFILL else
                                        what.replace("step@", "decode steps at batch "))

            def extra_round(n: int) -> None:
                bar.total += len(protocol.quantities())
                bar.set_description(f"calibrating {_name(info)}: noisy, extra round {n}/{protocol.max_rounds}")

            verdict = run_rounds(probe, protocol, tick, extra_round)
            workspace = kv = None
            if verdict.ok:  # refused: spare a busy machine the extra prefill, the estimate will do
                bar.set_postfix_str("prefill memory", refresh=False)
                workspace, kv = probe.prefill_memory(protocol.memory_rows, protocol.prompt_tokens)
                bar.update(1)
        finally:
            bar.close()
        return _conclude(pool, info, store, protocol, model, verdict, load_window, workspace, kv, estimate)


def _conclude(pool, info: ModelInfo, store: CalibrationStore, protocol: Protocol, model, verdict: Verdict,
              load_window: PeakWindow | None, workspace: float | None, kv: float | None,
              estimate: ModelCost | None) -> Calibration:
    estimate = estimate or _estimate(pool, info)
    measured_memory = load_window is not None and load_window.exact
    memory = dict(
        # never less than the tensors themselves (a window that reused freed heap under-reads)
        weight_bytes=max(load_window.retained if measured_memory else estimate.weight_bytes, model.weight_bytes),
        load_extra_bytes=load_window.peak_above_end if measured_memory else estimate.load_extra_bytes,
        kv_bytes_per_token=estimate.kv_bytes_per_token if kv is None else int(round(kv)),
        workspace_bytes_per_token=estimate.workspace_bytes_per_token if workspace is None else round(workspace, 1),
    )
    measured = None
    if all(q in verdict.values for q in protocol.quantities()):
        measured = ModelCost(
            prefill_s_per_token=verdict.values[PREFILL],
            decode_s_per_token=verdict.values[step_key(min(protocol.batch_sizes))],
            load_s=round(model.stats.load_seconds, 3),
            decode_step_s_by_batch=step_table(verdict.values, protocol.batch_sizes),
            **memory,
        )
    if verdict.ok and measured is not None:
        cost = measured
        store.save(info.key, cost, rounds=verdict.rounds, spread=round(verdict.spread, 3),
                   others_cpu=None if verdict.others_cpu is None else round(verdict.others_cpu, 3),
                   seconds=round(verdict.seconds, 1), memory="measured" if measured_memory else "estimated")
        log.info("calibrated %s in %.0f s (%d rounds, spread %.2fx): prefill %.2f ms/token, decode step %s ms",
                 info.key, verdict.seconds, verdict.rounds, verdict.spread, cost.prefill_s_per_token * 1e3,
                 {b: round(s * 1e3, 1) for b, s in cost.decode_step_s_by_batch.items()})
        return Calibration(info.alias, info.key, cost, True, verdict, measured_memory, measured=measured)
    previous = store.previous(info.key)
    timings = previous or estimate
    source = "the previous calibration's timings" if previous else "roofline timing estimates"
    log.warning("not storing the calibration of %s: %s. This run uses %s; the next run measures again (%s)",
                info.key, verdict.reason, source, SKIP_HINT)
    cost = ModelCost(prefill_s_per_token=timings.prefill_s_per_token, decode_s_per_token=timings.decode_s_per_token,
                     decode_step_s_by_batch=timings.decode_step_s_by_batch, load_s=round(model.stats.load_seconds, 3),
                     **memory)
    return Calibration(info.alias, info.key, cost, False, verdict, measured_memory, verdict.reason, measured)


# A served model's defaults until measured: it holds no local memory (the server's is its own business); the
# timings are a mid-size GPU server's order of magnitude, used only to rank batching choices.
REMOTE_PREFILL_S_PER_TOKEN, REMOTE_DECODE_S_PER_TOKEN = 2e-4, 0.02
LLAMACPP_PROTOCOL = dict(prompt_tokens=128, new_tokens=8, repeats=2)


def remote_key(spec) -> str:
    """A served model's timings hold for one served name at one URL (`task=calibrate` measures them)."""
    server = spec.get("server") or {}
    return f"{server.get('model')}|remote|openai|{server.get('base_url')}"


def engine_cost(pool, alias: str, store: CalibrationStore, auto_calibrate: bool) -> ModelCost | None:
    """The cost of an alias served by an engine other than hf, or None for hf (calibrated from its files).

    `openai`: no local memory (`CostModel` budgets only this process); the timings `task=calibrate` measured from
    the client (`compllm.calibration.remote`), else remote timing defaults. `llamacpp`: the
    stored calibration, else measured on the loaded model (`LlamaCppModel.calibrate`: the KV cache is allocated
    at load, so its resident bytes are all the memory it ever takes), else its resident bytes with hf-like
    estimates."""
    spec = pool.spec(alias)
    backend = str(spec.get("backend", "hf"))
    if backend == "openai":
        entry = store.get(remote_key(spec))
        if entry is not None:
            return entry.cost
        return ModelCost(weight_bytes=0, kv_bytes_per_token=0, prefill_s_per_token=REMOTE_PREFILL_S_PER_TOKEN,
                         decode_s_per_token=REMOTE_DECODE_S_PER_TOKEN, load_s=0.0)
    if backend != "llamacpp":
        return None
    settings = spec.get("llamacpp") or {}
    saved = (int(settings.get("prefix_cache_mb", 64)) << 20) if settings.get("prefix_cache", True) else 0
    cost = _llamacpp_cost(pool, alias, spec, settings, store, auto_calibrate)
    return replace(cost, weight_bytes=cost.weight_bytes + saved)  # the saved prefixes' memory, reserved in full


def _llamacpp_cost(pool, alias: str, spec, settings, store: CalibrationStore, auto_calibrate: bool) -> ModelCost:
    key = calibration_key(spec.get("name", alias), "cpu", "gguf", f"llamacpp-t{settings.get('threads', 1)}"
                          f"-seq{settings.get('n_seq_max', 9)}x{settings.get('n_ctx', 2048)}")
    entry = store.get(key)
    if entry is not None:
        return entry.cost
    model = _backend(pool, alias)
    if not auto_calibrate:
        return ModelCost(weight_bytes=model.resident_bytes, kv_bytes_per_token=0,
                         prefill_s_per_token=REMOTE_PREFILL_S_PER_TOKEN * 10,
                         decode_s_per_token=REMOTE_DECODE_S_PER_TOKEN, load_s=model.stats.load_seconds)
    with store.lock() as locked:
        log.info("calibrating %s on this machine, once (%s)", key, SKIP_HINT)
        cost = model.calibrate(**LLAMACPP_PROTOCOL)
        if locked:
            store.save(key, cost, rounds=LLAMACPP_PROTOCOL["repeats"], memory="measured")
    return cost


def import_model_code(info: ModelInfo) -> None:
    """Import the transformers module of the model's class (~120 MiB resident on a first load): process overhead,
    measured as base, not as the first model's bytes."""
    from compllm.backends import weights

    if info.directory:
        weights.model_class(info.directory)


def measure_base_bytes(pool, infos: Sequence[ModelInfo] = ()) -> int:
    """What the process holds besides loaded LLMs: resident now, minus what any model already loaded keeps (its
    estimated resident bytes, `facts`; its tensors where there are no facts)."""
    gc.collect()
    release_free_heap()
    by_alias = {info.alias: info for info in infos}
    held: dict[int, int] = {}
    for alias, model in pool.loaded().items():
        info = by_alias.get(alias)
        estimate = info.facts.weight_bytes(info.dtype) if info is not None and info.facts is not None else 0
        held[id(model)] = max(held.get(id(model), 0), getattr(model, "weight_bytes", 0), estimate)
    return max(current_rss_bytes() - sum(held.values()), 0)


def build_cost_model(pool, experts_to_alias: Mapping[str, str], cache_dir: str | None = None,
                     auto_calibrate: bool = True, progress: bool = True,
                     protocol: Protocol | None = None, also: Sequence[str] = ()) -> CostModel:
    """The cost model over every alias `experts_to_alias` names (expert -> model alias, aggregator included) and
    the aliases in `also` (the planner's).

    Per alias: the stored calibration; else, with `auto_calibrate`, a calibration now (stored when the machine
    was quiet enough, see `measure`); else estimates from the model's files (`facts`). `base_bytes` is measured
    now: call this after the router is fitted and before the LLMs load (loaded ones are subtracted, roughly)."""
    aliases = list(dict.fromkeys([*experts_to_alias.values(), *also]))
    store = CalibrationStore(cache_dir)
    costs: dict[str, ModelCost] = {}
    for alias in aliases:  # engines other than hf know their own costs
        cost = engine_cost(pool, alias, store, auto_calibrate)
        if cost is not None:
            costs[alias] = cost
    infos = {alias: describe(pool, alias) for alias in aliases if alias not in costs}
    for info in infos.values():  # model code imported now counts as base, not as the first model's weights
        import_model_code(info)
    base = measure_base_bytes(pool, list(infos.values()))
    stored = store.entries()
    for alias, info in infos.items():
        entry: Entry | None = stored.get(info.key)
        if entry is not None:
            costs[alias] = entry.cost
        elif auto_calibrate:
            costs[alias] = calibrate(pool, info, store, protocol, progress).cost
        else:
            log.info("%s has no calibration on this machine: using estimates (auto_calibrate=true measures it)",
                     info.key)
            costs[alias] = _estimate(pool, info)
    return CostModel(models=costs, expert_model=dict(experts_to_alias), base_bytes=base)

