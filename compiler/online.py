"""Online compilation: nodes arrive while a plan runs, and each batch of arrivals becomes a plan increment.

`OnlineCompiler.add(...)` admits sub-queries as the planner emits them and whole queries as requests arrive;
`compile()` runs the configured passes over everything admitted (leaving alone what earlier increments answer:
`PassContext.done`) and lowers only the new work, continuing the same `Lowering`, so new steps are appended
behind the steps already issued and depend on them as if lowered together. Issued steps never change; the
cumulative plan is verified after every increment; the runtime executes increments, it never re-plans.
Batch compilation is the special case of one increment.
"""
from __future__ import annotations

from typing import Mapping, Optional

from compiler.config import CompilerConfig, PassContext
from compiler.cost import CostModel
from compiler.ir import Graph, Node, Query
from compiler.lower import Lowering
from compiler.pass_manager import PassManager
from compiler.passes.registry import DERIVED
from compiler.plan import Plan, Step
from compiler.verify import verify


class OnlineCompiler:
    def __init__(self, cost: CostModel, config: Optional[CompilerConfig] = None, resident: Mapping[str, int] = {}):
        self.cost = cost
        self.config = config if config is not None else CompilerConfig()
        self.config.validate()
        self.manager = PassManager(self.config.pipeline, self.config.disabled, verify_each=self.config.verify)
        self.graph = Graph()  # every node admitted so far, as compiled (deduped nodes removed, fused ones merged)
        self.lowering = Lowering()
        self.lowering.reserved.update({m: 0 for m in resident if m in cost.models})
        self.plan = Plan([], self.config.memory_budget, {}, self.config.streams, self.config.residency.value, {},
                         self.graph, cost.base_bytes, {}, tuple(self.lowering.reserved))
        self._new: set[str] = set()  # admitted, not compiled yet

    def add(self, nodes: list[Node], queries: list[Query] = ()) -> None:
        """Admit nodes (their parents admitted earlier or among them) and the queries they complete. A parent an
        earlier increment deduplicated away is read from the node that answers for it."""
        aliases = self.plan.aliases
        for node in nodes:
            if any(p in aliases for p in node.inputs.values()):
                node = node.with_(inputs={label: aliases.get(p, p) for label, p in node.inputs.items()})
            self.graph.add(node)
            self._new.add(node.id)
        for query in queries:
            self.graph.add_query(query)

    def add_graph(self, graph: Graph) -> None:
        self.add(list(graph.nodes.values()), list(graph.queries.values()))

    @property
    def pending(self) -> int:
        return len(self._new)

    def compile(self) -> list[Step]:
        """The next increment: steps for every node admitted since the last one (possibly none)."""
        if not self._new:
            return []
        done = frozenset(self.lowering.step_of_node)
        resident = {m: b for m, b in self.lowering.reserved.items()}
        ctx = PassContext.for_cost(self.cost, self.config, resident, done)
        compiled = self.manager.run(self.graph, ctx)
        increment = self.lowering.lower(compiled, ctx)
        self.graph = compiled
        for key in DERIVED:  # this increment's batches and schedule; the aliases (facts) stay for the next
            self.graph.annotations.pop(key, None)
        plan = self.plan
        plan.graph = compiled
        plan.steps.extend(increment.steps)
        plan.aliases.update(increment.aliases)
        for model, size in increment.footprints.items():
            plan.footprints[model] = max(plan.footprints.get(model, 0), size)
        plan.load_extra.update(increment.load_extra)
        self._new.clear()
        if self.config.verify:
            plan.verify(self.cost)
        return increment.steps
