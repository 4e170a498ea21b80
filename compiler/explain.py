"""`explain`: what the compiler did to a graph and what the plan will cost, as stable text."""
from __future__ import annotations

from compiler.ir import Graph
from compiler.pass_manager import ir_text
from compiler.plan import Plan, StepKind


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def explain_text(before: Graph, plan: Plan) -> str:
    """IR before passes, after each pass (when the compile kept dumps), the plan, span and memory profile."""
    out = ["== IR before passes", ir_text(before)]
    dumps = plan.report.dumps if plan.report is not None else []
    for name, text in dumps:
        if name != "input":  # the pass manager's first dump is the input graph, already shown above
            out += [f"== IR after {name}", text]
    out += ["== plan", plan.dump()]
    if plan.devices:  # on a cluster: where each model lives and what each device runs
        out += ["== placement", plan.placement_text()]
    guarded = [n for n in plan.graph if n.guard is not None] if plan.graph is not None else []
    if guarded:  # a cascade: which parts may escalate, to which model, on what condition
        out += [f"== cascade ({len(guarded)} escalate nodes; each runs only when its guard holds, else it takes the "
                "draft's answer)"]
        out += [f"  {n.id} on {n.model}: if {n.guard.describe()} (expected rate {n.guard.expected_rate:g})"
                for n in guarded]
    budget = "unlimited" if plan.memory_budget is None else _gib(plan.memory_budget)
    calls = plan.count(StepKind.GENERATE)
    hosts = plan.count(StepKind.HOST)
    out += [
        "== estimates (cost model)",
        f"  estimated span: {plan.estimated_span_s():.2f} s  (critical path {plan.critical_path_s():.2f} s)",
        f"  model calls: {calls}; answered on the host without a call: {hosts}",
        f"  planned peak memory: {_gib(plan.peak_planned_bytes)} of budget {budget} (runtime base "
        f"{_gib(plan.base_bytes)})",
        f"  loads: {plan.loads}",
        f"  prefill saved by prefix caches: {plan.prefill_saved} prompt tokens"
        + "".join(f"; {s.id} {s.prefill_saved}" for s in plan.steps if s.prefill_saved),
        "  engines: " + (", ".join(f"{m}={e}" for m, e in plan.engines.items()) or "hf (in process, no prefix cache)"),
        *([f"  knowledge lookups: {plan.count(StepKind.RETRIEVE)} retrieve steps for "
           f"{sum(len(st.nodes) for st in plan.steps if st.kind is StepKind.RETRIEVE)} questions, "
           f"{sum(st.est_s for st in plan.steps if st.kind is StepKind.RETRIEVE):.3f} s"]
          if plan.count(StepKind.RETRIEVE) else []),
        "== memory profile (bytes held after each step; the most held while it runs)",
    ]
    out += [f"  {sid}: {_gib(after)} (up to {_gib(during)})" if during > after else f"  {sid}: {_gib(after)}"
            for sid, after, during in plan.memory_profile()]
    return "\n".join(out) + "\n"
