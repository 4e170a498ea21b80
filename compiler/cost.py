"""The memory/latency cost model: what passes decide with, what the simulator (`compiler.simulate`) replays.

Numbers come from calibration (`compllm task=calibrate`, or automatically on a model's first run) or from a
roofline estimate (`ModelCost.roofline`). Kept deliberately simple and documented, so a benchmark can check it
against measurement and say where it is off. Memory is the process's: the runtime's base, each resident
model's weights in their compute dtype, a load's transient, and each running call's KV and prefill workspace.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Sequence

from compiler.errors import ConfigError
from compiler.ir import Graph, Node, NodeKind
from compiler.verify import UnknownExpertError

CALIBRATION_VERSION = 1


def admit_rows(free: int, pending: int, live: int) -> int:
    """How many waiting rows join a running batch now (shared by the hf backend and the cost model).

    All that fit when nothing is live; otherwise only once at least half the slots (or all the waiting rows) can
    join: every join is a prefill, and on CPU a prefill of several rows costs less per token than one row at a
    time (`experiments/bench_prefill.py`).
    """
    if pending <= 0 or free <= 0:
        return 0
    if live == 0:
        return min(free, pending)
    slots = free + live
    return min(free, pending) if free >= min(math.ceil(slots / 2), pending) else 0


@dataclass(frozen=True)
class ModelCost:
    """Cost of one model alias (weights shared by every expert that names it)."""

    weight_bytes: int
    kv_bytes_per_token: int
    prefill_s_per_token: float
    decode_s_per_token: float  # one decode step at batch size 1
    call_overhead_s: float = 0.0  # fixed cost per generate call (launch, tokenization, sampling setup)
    load_s: Optional[float] = None  # None: weight_bytes / CostModel.load_bytes_per_s
    # Measured seconds of one decode step by batch size ({"1": s, "4": s, ...}; str keys survive JSON).
    # Real kernels are not linear in batch size (fp32 on a 2-core CPU: F.linear's step grows 2.5x from batch 1
    # to 8, the weight-major kernel's 2x), so where measured this replaces the batch_alpha formula.
    decode_step_s_by_batch: Optional[Mapping[str, float]] = None
    # Memory beyond the weights, so the plan's peak is what the process really holds:
    load_extra_bytes: int = 0  # held only while loading (e.g. the on-disk copy mapped while weights convert)
    workspace_bytes_per_token: float = 0.0  # activations of a prefill, per prompt token it computes at once

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "decode_step_s_by_batch":
                if value is not None and not all(int(k) >= 1 and float(v) > 0 for k, v in value.items()):
                    raise ConfigError(f"ModelCost.{f.name} must map batch sizes >= 1 to positive seconds")
                continue
            if value is not None and (not isinstance(value, (int, float)) or value < 0 or math.isnan(value)):
                raise ConfigError(f"ModelCost.{f.name} must be a non-negative number, got {value!r}")

    def measured_step_seconds(self, batch_size: int) -> Optional[float]:
        """Decode-step seconds at `batch_size` from the measured table: the smallest measured size >= it,
        or, past the largest, that size's per-row cost times the batch; None when nothing was measured.

        Never more than `batch_size` steps at batch 1: no kernel measured here (F.linear, weight-major; 1-8 rows)
        was slower batched than row by row, so a table that says so is measurement noise from a busy machine,
        and believing it would make the batch pass split every batch."""
        if not self.decode_step_s_by_batch:
            return None
        table = sorted((int(k), float(v)) for k, v in self.decode_step_s_by_batch.items())
        row_by_row = batch_size * table[0][1] / table[0][0]
        for size, seconds in table:
            if size >= batch_size:
                return min(seconds, row_by_row)
        size, seconds = table[-1]
        return min(seconds * batch_size / size, row_by_row)

    @classmethod
    def roofline(cls, params: int, bytes_per_param: float, layers: int, kv_heads: int, head_dim: int,
                 mem_bandwidth_Bps: float, flops: float, *, kv_bytes_per_elem: float = 2.0,
                 call_overhead_s: float = 0.0) -> "ModelCost":
        """First-principles default when nothing was measured.

        - weights: params x bytes_per_param;
        - KV per token: K and V (2) x layers x kv_heads x head_dim x bytes per element (bf16 cache = 2);
        - prefill is compute bound: ~2 FLOPs per parameter per token;
        - a decode step at batch 1 is memory bound: all weights are read once (or compute, if slower).
        Real kernels reach a fraction of peak, so treat these as lower bounds; calibration replaces them.
        """
        if min(params, bytes_per_param, layers, kv_heads, head_dim, mem_bandwidth_Bps, flops) <= 0:
            raise ConfigError("ModelCost.roofline: every argument must be positive")
        weight_bytes = int(params * bytes_per_param)
        compute_s = 2.0 * params / flops
        return cls(
            weight_bytes=weight_bytes,
            kv_bytes_per_token=int(2 * layers * kv_heads * head_dim * kv_bytes_per_elem),
            prefill_s_per_token=compute_s,
            decode_s_per_token=max(weight_bytes / mem_bandwidth_Bps, compute_s),
            call_overhead_s=call_overhead_s,
        )


@dataclass(frozen=True)
class Engine:
    """What the compiler knows of the engine that runs a model alias (from its config, not measured)."""

    name: str = "hf"  # hf | llamacpp | openai
    # The engine keeps the KV of shared prompt prefixes across rows and calls (llama.cpp in process; a server with
    # prefix caching on), so a prefix shared by a call's rows is computed once, and not at all once computed.
    prefix_cache: bool = False
    # Requests a server runs at once (its slots: `max_concurrency`); None for an in-process engine. A remote call
    # never has more rows in flight, and holds no local memory.
    concurrency: Optional[int] = None
    # Rows that join together are prefilled left-padded to the longest prompt (hf); False: each row computes only
    # its own prompt tokens (llama.cpp's per-sequence prefill, a server's requests).
    left_padded: bool = True
    note: str = ""  # shown by `explain` (e.g. where a server is and whether its timings were measured)

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"Engine {self.name!r}: concurrency must be >= 1 or None, got {self.concurrency!r}")

    @property
    def remote(self) -> bool:
        return self.concurrency is not None

    def describe(self) -> str:
        bits = [self.name] + (["prefix cache"] if self.prefix_cache else []) + (
            [f"server, {self.concurrency} concurrent requests"] if self.remote else []) + (
            [self.note] if self.note else [])
        return ", ".join(bits)


@dataclass(frozen=True)
class SourceCost:
    """Cost of one knowledge source (a retrieve node's index), measured when the process loads it."""

    bytes: int = 0  # the loaded index; held for the whole run, so `CostModel.with_sources` adds it to the base
    query_s: float = 0.0  # seconds per query in a batched lookup
    call_s: float = 0.0  # fixed seconds per lookup call

    def __post_init__(self) -> None:
        if min(self.bytes, self.query_s, self.call_s) < 0:
            raise ConfigError(f"SourceCost fields must be non-negative, got {self}")


@dataclass
class CostModel:
    """Per-alias costs plus the expert -> alias mapping (aggregate nodes use expert "aggregator")."""

    models: dict[str, ModelCost]
    expert_model: dict[str, str]
    # Batching discount: a decode step of batch b costs decode_s_per_token * (1 + batch_alpha * (b - 1)),
    # i.e. far less than b separate steps, because decode is bound by reading the weights, shared by the batch.
    batch_alpha: float = 0.1
    default_output_tokens: int = 64  # used when a node carries no output-token estimate
    prompt_overhead_tokens: int = 0  # system prompt + chat template tokens added to every call
    load_bytes_per_s: float = 2e9  # disk/host -> device bandwidth for loads without a measured load_s
    base_bytes: int = 0  # what the process holds before any model loads (runtime, imports, router embedder)
    engines: dict[str, Engine] = field(default_factory=dict)  # alias -> its engine (absent: hf, no prefix cache)
    # Expert -> prompt tokens every call of it starts with (chat template head + its system prompt): the prefix
    # its rows share, which an engine with a prefix cache computes once (`prefill_saved`).
    prefix_tokens: dict[str, int] = field(default_factory=dict)
    # Knowledge sources (retrieve nodes): measured per process, never part of the calibration file.
    sources: dict[str, SourceCost] = field(default_factory=dict)
    expert_source: dict[str, str] = field(default_factory=dict)  # expert -> the source its retrieve nodes read

    def __post_init__(self) -> None:
        for expert, alias in self.expert_model.items():
            if alias not in self.models:
                raise ConfigError(f"expert {expert!r} runs on model {alias!r}, which the cost model does not know; "
                                  f"known models: {', '.join(sorted(self.models)) or '(none)'}")
        if self.batch_alpha < 0 or self.load_bytes_per_s <= 0 or self.default_output_tokens < 0 or self.base_bytes < 0:
            raise ConfigError("CostModel: batch_alpha, default_output_tokens and base_bytes must be >= 0, "
                              "load_bytes_per_s > 0")
        unknown = sorted(set(self.engines) - set(self.models))
        if unknown:
            raise ConfigError(f"CostModel.engines names model(s) {', '.join(unknown)} the cost model does not know")
        bad = {e: t for e, t in self.prefix_tokens.items() if not isinstance(t, int) or t < 0}
        if bad:
            raise ConfigError(f"CostModel.prefix_tokens must map experts to token counts >= 0, got {bad}")

    # --- lookups -------------------------------------------------------------------------------
    def model_of(self, node: Node) -> str:
        """The model alias that runs `node`: its own (a cascade's escalation) or its expert's (raises the verifier's
        UnknownExpertError for an unknown expert)."""
        if node.model:
            if node.model not in self.models:
                raise ConfigError(f"node {node.id!r} runs on model {node.model!r}, which the cost model does not "
                                  f"know; known models: {', '.join(sorted(self.models))}")
            return node.model
        alias = self.expert_model.get(node.expert)
        if alias is None:
            raise UnknownExpertError(node.id, node.expert, self.expert_model)
        return alias

    def engine(self, alias: str) -> Engine:
        return self.engines.get(alias) or Engine()

    def prefix_of(self, node: Node) -> tuple[str, int]:
        """(key, tokens) of the prompt prefix `node` shares with every call of its expert, if its model's engine
        keeps shared prefixes; ("", 0) otherwise."""
        alias = self.model_of(node)
        tokens = self.prefix_tokens.get(node.expert, 0)
        if not tokens or not self.engine(alias).prefix_cache:
            return "", 0
        return f"{alias}/{node.expert}", tokens

    def prefill_saved(self, alias: str, prefixes: Sequence[tuple[str, int]], cached: set[str] = frozenset()) -> int:
        """Prompt tokens a call's rows do not compute thanks to the engine's prefix cache: each shared prefix (key,
        tokens) is computed once for all its rows, and not at all when an earlier call left it `cached`."""
        if not self.engine(alias).prefix_cache:
            return 0
        saved, seen = 0, set(cached)
        for key, tokens in prefixes:
            if key and tokens:
                saved += tokens if key in seen else 0
                seen.add(key)
        return saved
    def source_of(self, node: Node) -> str:
        """The knowledge source a retrieve node reads (its expert's)."""
        source = self.expert_source.get(node.expert)
        if source is None or source not in self.sources:
            raise ConfigError(f"retrieve node {node.id!r}: expert {node.expert!r} has no costed knowledge source; "
                              f"known: {dict(self.expert_source)}")
        return source

    def retrieve_seconds(self, source: str, queries: int) -> float:
        """Seconds of one batched lookup of `queries` questions."""
        sc = self.sources[source]
        return sc.call_s + queries * sc.query_s

    def with_sources(self, sources: Mapping[str, SourceCost], expert_source: Mapping[str, str]) -> "CostModel":
        """A copy that costs retrieve nodes; the indexes stay loaded for the whole run, so they join the base."""
        added = sum(sc.bytes for name, sc in sources.items() if name not in self.sources)
        return replace(self, sources={**self.sources, **sources}, expert_source={**self.expert_source, **expert_source},
                       base_bytes=self.base_bytes + added)

    def cost(self, alias: str) -> ModelCost:
        try:
            return self.models[alias]
        except KeyError:
            raise ConfigError(f"no cost entry for model {alias!r}") from None

    # --- tokens and memory ---------------------------------------------------------------------
    def output_tokens(self, node: Node) -> int:
        """Tokens the node's call writes: 0 for a host node, the default when the estimate is unknown."""
        if node.host is not None:
            return 0
        if node.kind is NodeKind.RETRIEVE:  # its passages are pasted into the reader's prompt
            return node.est_output_tokens or 0
        return self.default_output_tokens if node.est_output_tokens is None else node.est_output_tokens

    def node_tokens(self, node: Node, graph: Graph | None = None) -> tuple[int, int]:
        """(prompt, output) tokens. Parents' answers are pasted into the prompt, so they count as prompt."""
        prompt = node.est_prompt_tokens + self.prompt_overhead_tokens + self.prefix_tokens.get(node.expert, 0)
        if graph is not None:
            nodes = graph.nodes
            guarded = node.guard.source if node.guard is not None else None  # read by the guard, not the prompt
            prompt += sum(self.output_tokens(nodes[p]) for p in node.parents if p in nodes and p != guarded)
        return prompt, self.output_tokens(node)

    @staticmethod
    def expected_share(nodes: Sequence[Node]) -> float:
        """The share of a call's rows expected to run: guarded (escalate) rows run with their guard's expected
        rate, others always. Time estimates scale by it; memory never does (every row may run)."""
        if not nodes:
            return 1.0
        return sum(n.guard.expected_rate if n.guard is not None else 1.0 for n in nodes) / len(nodes)

    def node_kv_bytes(self, node: Node, graph: Graph | None = None) -> int:
        prompt, output = self.node_tokens(node, graph)
        return (prompt + output) * self.cost(self.model_of(node)).kv_bytes_per_token

    def batch_kv_bytes(self, alias: str, tokens: Sequence[tuple[int, int]], slots: Optional[int] = None) -> int:
        """KV of a left-padded batch (what the hf backend allocates): live rows x (longest prompt + longest
        output); with `slots`, at most that many rows are live (the backend crops columns that are padding
        in every live row, so no row's cache outgrows the call's longest)."""
        if not tokens:
            return 0
        longest = max(p for p, _ in tokens) + max(o for _, o in tokens)
        rows = len(tokens) if slots is None else min(slots, len(tokens))
        return rows * longest * self.cost(alias).kv_bytes_per_token

    def batch_workspace_bytes(self, alias: str, tokens: Sequence[tuple[int, int]],
                              slots: Optional[int] = None) -> int:
        """Activation scratch of a call's largest prefill, bounded above: at most `slots` rows join at once, each
        padded to the call's longest prompt."""
        per_token = self.cost(alias).workspace_bytes_per_token
        if not tokens or not per_token:
            return 0
        rows = len(tokens) if slots is None else min(slots, len(tokens))
        return int(rows * max(p for p, _ in tokens) * per_token)

    def batch_bytes(self, alias: str, tokens: Sequence[tuple[int, int]], slots: Optional[int] = None) -> int:
        """Memory one generate call holds on top of its model's weights: KV plus prefill workspace."""
        return self.batch_kv_bytes(alias, tokens, slots) + self.batch_workspace_bytes(alias, tokens, slots)

    # --- time ----------------------------------------------------------------------------------
    def decode_step_seconds(self, alias: str, batch_size: int) -> float:
        mc = self.cost(alias)
        measured = mc.measured_step_seconds(max(batch_size, 1))
        if measured is not None:
            return measured
        return mc.decode_s_per_token * (1.0 + self.batch_alpha * (max(batch_size, 1) - 1))

    def call_phases(self, tokens: Sequence[tuple[int, int]],
                    slots: Optional[int] = None) -> list[tuple[list[tuple[int, int]], int, int]]:
        """One generate call as the hf backend runs it, as phases (rows that join, then decode steps, at live
        batch size): rows join in order, at most `slots` live (None: all at once), in groups `admit_rows` allows,
        and each row leaves when its answer is done, so a phase ends whenever a row leaves."""
        slots = len(tokens) if slots is None else max(1, min(slots, len(tokens)))
        pending = list(tokens)
        live: list[int] = []  # decode steps each live row still needs
        phases = []
        while pending or live:
            admit = admit_rows(slots - len(live), len(pending), len(live))
            group, pending = pending[:admit], pending[admit:]
            live += [o for _, o in group]
            steps = min(live)  # decode until the next row leaves (the next moment a row may join)
            phases.append((group, steps, len(live)))
            live = [o - steps for o in live if o > steps]
        return phases

    def batch_seconds(self, alias: str, tokens: Sequence[tuple[int, int]], slots: Optional[int] = None) -> float:
        """Seconds of one generate call (see `call_phases`): each joining group's prefill is left-padded (every
        row at its longest prompt) on engines that pad (`Engine.left_padded`), and a decode step's cost follows
        the live batch size."""
        if not tokens:
            return 0.0
        mc = self.cost(alias)
        padded = self.engine(alias).left_padded
        seconds = mc.call_overhead_s
        for group, steps, live in self.call_phases(tokens, slots):
            if group:
                prompt = len(group) * max(p for p, _ in group) if padded else sum(p for p, _ in group)
                seconds += prompt * mc.prefill_s_per_token
            seconds += steps * self.decode_step_seconds(alias, live)
        return seconds

    def decode_steps(self, tokens: Sequence[tuple[int, int]], slots: Optional[int] = None) -> int:
        """Decode steps (forward passes that read all weights) of one generate call."""
        return sum(steps for _, steps, _ in self.call_phases(tokens, slots))

    def load_seconds(self, alias: str) -> float:
        mc = self.cost(alias)
        return mc.load_s if mc.load_s is not None else mc.weight_bytes / self.load_bytes_per_s

    # --- (de)serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable; `from_calibration(to_dict())` round-trips."""
        return {
            "version": CALIBRATION_VERSION,
            "batch_alpha": self.batch_alpha,
            "default_output_tokens": self.default_output_tokens,
            "prompt_overhead_tokens": self.prompt_overhead_tokens,
            "load_bytes_per_s": self.load_bytes_per_s,
            "base_bytes": self.base_bytes,
            "engines": {alias: asdict(e) for alias, e in self.engines.items()},
            "prefix_tokens": dict(self.prefix_tokens),
            "models": {alias: asdict(mc) for alias, mc in self.models.items()},
            "experts": dict(self.expert_model),
        }

    @classmethod
    def from_calibration(cls, data: Mapping[str, Any]) -> "CostModel":
        """Build from a calibration dict (see `to_dict`); unknown keys are errors, so typos never pass silently."""
        data = dict(data)
        version = data.pop("version", CALIBRATION_VERSION)
        if version != CALIBRATION_VERSION:
            raise ConfigError(f"calibration version {version!r} is not supported (expected {CALIBRATION_VERSION})")
        models_raw = data.pop("models", None)
        experts = data.pop("experts", None)
        if not isinstance(models_raw, Mapping) or not isinstance(experts, Mapping):
            raise ConfigError("calibration needs a 'models' mapping (alias -> costs) and an 'experts' mapping "
                              "(expert -> alias)")
        scalars = {"batch_alpha", "default_output_tokens", "prompt_overhead_tokens", "load_bytes_per_s", "base_bytes"}
        engines_raw = data.pop("engines", {}) or {}
        prefix_tokens = dict(data.pop("prefix_tokens", {}) or {})
        unknown = set(data) - scalars
        if unknown:
            raise ConfigError(f"unknown calibration keys: {', '.join(sorted(unknown))}")
        model_keys = {f.name for f in fields(ModelCost)}
        models = {}
        for alias, raw in models_raw.items():
            bad = set(raw) - model_keys
            if bad:
                raise ConfigError(f"model {alias!r}: unknown cost keys {', '.join(sorted(bad))}")
            try:
                models[alias] = ModelCost(**raw)
            except TypeError as exc:
                raise ConfigError(f"model {alias!r}: {exc}") from None
        try:
            engines = {alias: Engine(**raw) for alias, raw in engines_raw.items()}
        except TypeError as exc:
            raise ConfigError(f"calibration engines: {exc}") from None
        return cls(models=models, expert_model=dict(experts), engines=engines, prefix_tokens=prefix_tokens, **data)
