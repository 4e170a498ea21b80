"""Pass manager (contracts, ordering) and the individual passes: dedupe, fuse, batch, schedule, residency."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.build import FinalAnswer
from compiler.build import RoutedSubQuery as Sq
from compiler.build import add_query
from compiler.chains import split_answer
from compiler.config import CompilerConfig, PassContext, ResidencyPolicy
from compiler.cost import CostModel, ModelCost
from compiler.errors import ConfigError, MemoryBudgetError, PassError
from compiler.ir import Graph, Node, NodeKind
from compiler.levels import topo_levels, topo_order
from compiler.pass_manager import PassManager, PipelineError, check_pipeline
from compiler.passes import Pass
from compiler.passes.batch import make_batches
from compiler.passes.dedupe import dedupe
from compiler.passes.fuse import fuse
from compiler.passes.residency import Op, plan_residency
from compiler.passes.schedule import order_batches
from compiler.synthetic import random_graph
from compiler.verify import CycleError, verify

EXPERTS = ["general", "law", "math"]


def cost(kv: int = 1) -> CostModel:
    return CostModel({"small": ModelCost(100, kv, 1e-3, 1e-2), "big": ModelCost(300, 2 * kv, 2e-3, 2e-2)},
                     {"general": "small", "math": "small", "law": "big", "aggregator": "big"})


def ctx(**config) -> PassContext:
    return PassContext.for_cost(cost(), CompilerConfig(**config))


def france(g: Graph, qid: str, second: Sq) -> None:
    add_query(g, qid, f"{qid}?", [Sq(1, "What is the capital of France?", (), "general"), second], "aggregator",
              final=FinalAnswer.model)


# --- dedupe ---------------------------------------------------------------------------------------

def test_dedupe_across_queries_rewires_children_and_keeps_sinks():
    g = Graph()
    france(g, "q0", Sq(2, "How many people live in #1?", (1,), "law"))
    france(g, "q1", Sq(2, "What river flows through #1?", (1,), "general"))
    out = dedupe(g, ctx())
    verify(out, cost().expert_model)
    assert "q1:1" not in out.nodes and out.annotations["aliases"] == {"q1:1": "q0:1"}
    assert out.nodes["q1:2"].inputs == {"#1": "q0:1"}
    assert out.nodes["q1:agg"].inputs == {"#1": "q0:1", "#2": "q1:2"}
    assert {q.sink for q in out.queries.values()} <= set(out.nodes)
    assert len(g) == 6  # the input graph is untouched


def test_dedupe_is_transitive_through_deduped_parents_but_never_merges_aggregates():
    g = Graph()
    france(g, "q0", Sq(2, "How many people live in #1?", (1,), "law"))
    france(g, "q1", Sq(2, "How many people live in #1?", (1,), "law"))
    out = dedupe(g, ctx())
    assert out.annotations["aliases"] == {"q1:1": "q0:1", "q1:2": "q0:2"}
    assert out.nodes["q1:agg"].inputs == {"#1": "q0:1", "#2": "q0:2"}
    assert {"q0:agg", "q1:agg"} <= set(out.nodes)  # identical queries still get one sink each


def test_dedupe_keeps_different_experts_types_and_parents_apart():
    g = Graph()
    add_query(g, "q0", "a", [Sq(1, "Same text?", (), "general"), Sq(2, "Other?", (), "general"),
                             Sq(3, "Uses #1", (1,), "general")], "aggregator", final=FinalAnswer.model)
    add_query(g, "q1", "b", [Sq(1, "Same text?", (), "math"), Sq(2, "Same text?", (), "general", "number"),
                             Sq(3, "Uses #1", (1,), "general")], "aggregator", final=FinalAnswer.model)
    out = dedupe(g, ctx())
    assert out is g and "aliases" not in out.annotations  # nothing identical: same graph back


def test_dedupe_within_one_query_label_names_do_not_matter():
    g = Graph()
    add_query(g, "q0", "a", [Sq(1, "Base?", (), "general"), Sq(2, "Twice #1?", (1,), "general"),
                             Sq(3, "Twice #1?", (1,), "general")], "aggregator", final=FinalAnswer.model)
    out = dedupe(g, ctx())
    assert out.annotations["aliases"] == {"q0:3": "q0:2"}
    assert out.nodes["q0:agg"].parents == ("q0:1", "q0:2")
    verify(out)


# --- fuse -----------------------------------------------------------------------------------------

def chain_graph(final: FinalAnswer = FinalAnswer.model) -> Graph:
    g = Graph()
    add_query(g, "q0", "chain", [
        Sq(1, "Who wrote Hamlet?", (), "general", max_new_tokens=10),
        Sq(2, "When was #1 born?", (1,), "general", max_new_tokens=10),
        Sq(3, "Where did #2 happen?", (2,), "general", max_new_tokens=10),
        Sq(4, "Is #3 a law?", (3,), "law"),
    ], "aggregator", final=final)
    return g


def test_fuse_is_off_by_default():
    g = chain_graph()
    assert fuse(g, ctx()) is g


def test_fuse_chains_asks_one_call_and_keeps_members_as_part_nodes():
    g = chain_graph()
    out = fuse(g, ctx(fuse=["chains"]))
    verify(out, cost().expert_model)
    fused = out.nodes["q0:3"]
    assert fused.fused_from == ("q0:1", "q0:2", "q0:3") and fused.inputs == {}
    assert "Step 2: When was [the answer to step 1] born?" in fused.template
    assert fused.est_output_tokens == 30 + 3 * 4 and fused.est_prompt_tokens == sum(
        g.nodes[n].est_prompt_tokens for n in fused.fused_from)
    for part in ("q0:1", "q0:2"):  # still answerable by id: the aggregate's prompt does not change
        assert out.nodes[part].part_of == "q0:3" and out.nodes[part].parents == ("q0:3",)
        assert out.nodes[part].est_output_tokens == g.nodes[part].est_output_tokens
    assert out.nodes["q0:agg"] == g.nodes["q0:agg"] and out.nodes["q0:4"] == g.nodes["q0:4"]
    assert "fused_from(q0:1, q0:2, q0:3)" in out.dump() and "part_of(q0:3)" in out.dump()
    levels = topo_levels(out)
    assert levels["q0:1"] == levels["q0:2"] == levels["q0:3"] == 0 and levels["q0:4"] == 1


def test_fuse_drops_members_nothing_else_reads():
    g = chain_graph()
    g.nodes["q0:agg"] = g.nodes["q0:agg"].with_(inputs={"#1": "q0:1", "#4": "q0:4"}, template="chain")
    out = fuse(g, ctx(fuse=["chains"]))
    verify(out, cost().expert_model)
    assert out.nodes["q0:1"].part_of == "q0:3" and "q0:2" not in out.nodes
    assert out.nodes["q0:3"].fused_from == ("q0:1", "q0:2", "q0:3")


def test_fuse_respects_max_chain_and_skips_trees():
    short = fuse(chain_graph(), ctx(fuse=["chains"], fuse_max_chain=2))
    assert short.nodes["q0:2"].fused_from == ("q0:1", "q0:2")
    assert short.nodes["q0:3"].inputs == {"#2": "q0:2"} and not short.nodes["q0:3"].fused_from  # reads step 2
    g = Graph()
    add_query(g, "q0", "tree", [Sq(1, "root?", (), "general"), Sq(2, "left #1", (1,), "general"),
                                Sq(3, "right #1", (1,), "general")], "aggregator")
    assert fuse(g, ctx(fuse=["chains"])) is g


def test_fused_plan_runs_the_chain_once():
    from compiler import compile
    plan = compile(chain_graph(), cost(), CompilerConfig(fuse=["chains"]))
    gens = [s for s in plan.steps if s.nodes]
    assert [s.nodes for s in gens] == [("q0:3",), ("q0:4",), ("q0:agg",)]
    step_of = plan.step_of_node()
    assert step_of["q0:1"] == step_of["q0:2"] == step_of["q0:3"] == gens[0].id
    assert gens[0].id in gens[2].deps


def test_a_joined_final_answer_reads_only_the_last_step_so_the_whole_chain_fuses_away():
    from compiler import compile
    from compiler.plan import StepKind
    plan = compile(chain_graph(FinalAnswer.join), cost(), CompilerConfig(fuse=["chains"]))
    assert [(s.kind, s.nodes) for s in plan.steps if s.nodes] == [
        (StepKind.GENERATE, ("q0:3",)), (StepKind.GENERATE, ("q0:4",)), (StepKind.HOST, ("q0:agg",))]
    assert "q0:1" not in plan.graph.nodes  # read by nothing but the next step: no part node left
    assert plan.graph.nodes["q0:agg"].parents == ("q0:4",)


def test_split_answer_parses_steps_and_falls_back_to_whole_reply():
    node = Node("c", NodeKind.SUBQUERY, "t", "general", fused_from=("a", "b", "c"))
    assert split_answer(node, "Step 1: Shakespeare\nStep 2: 1564\ncontinued\nstep 3) Stratford") == {
        "a": "Shakespeare", "b": "1564 continued", "c": "Stratford"}
    assert split_answer(node, "just text") == {"a": "", "b": "", "c": "just text"}
    plain = Node("x", NodeKind.SUBQUERY, "t", "general")
    assert split_answer(plain, "hi") == {"x": "hi"}


def test_unknown_fuse_variants_are_refused_listing_the_known_ones():
    for variant in ("siblings", "zigzag"):
        with pytest.raises(ConfigError, match=f"'{variant}' is not a valid FuseVariant.*fuse: chains"):
            CompilerConfig(fuse=[variant]).validate()


# --- batch ----------------------------------------------------------------------------------------

def wide_graph(n: int) -> Graph:
    g = Graph()
    for q in range(n):
        add_query(g, f"q{q}", "x", [Sq(1, f"Question {q}?", (), "general", max_new_tokens=4)], "aggregator", 4,
                  final=FinalAnswer.model)
    return g


def test_batch_groups_same_level_same_model_up_to_max_size():
    g = wide_graph(10)
    batches = make_batches(g, ctx(), max_size=4)
    assert [(b.level, b.model, len(b.nodes)) for b in batches] == [
        (0, "small", 4), (0, "small", 4), (0, "small", 2), (1, "big", 4), (1, "big", 4), (1, "big", 2)]


def test_batch_kv_limit_splits_batches_and_names_bytes_when_one_node_cannot_fit():
    g = wide_graph(4)
    one_model = CostModel({"small": ModelCost(100, 1, 1e-3, 1e-2)}, {"general": "small", "aggregator": "small"})
    # "Question k?" = 3 prompt tokens + 4 output = 7 tokens x 1 B/token: budget 100 + 14 fits two per batch
    batches = make_batches(g, PassContext.for_cost(one_model, CompilerConfig(memory_budget=115)), max_size=8)
    assert [len(b.nodes) for b in batches if b.level == 0] == [2, 2]
    with pytest.raises(MemoryBudgetError) as err:
        make_batches(g, PassContext.for_cost(one_model, CompilerConfig(memory_budget=106)), max_size=8)
    # the error reports the largest need (an aggregate: 1 prompt + 4 parent answer + 4 output tokens), i.e. the
    # smallest budget that would work, not merely the first node that did not fit
    assert err.value.needed_bytes == 109 and err.value.budget_bytes == 106
    assert str(err.value) == ("model 'small' needs 109 bytes (runtime base 0 + weights 100 + KV and workspace 9 "
                              "for node 'q0:agg' alone) but the memory budget is 106 bytes (3 bytes short)")


def test_host_nodes_are_never_batched_and_cost_nothing():
    g = Graph()
    add_query(g, "q0", "x", [Sq(1, "a?", (), "general"), Sq(2, "b?", (), "general")], "aggregator", 50)
    sink = g.nodes["q0:agg"]
    assert sink.host is not None and not sink.needs_model and cost().output_tokens(sink) == 0
    batches = make_batches(g, ctx(), max_size=8)
    assert [b.nodes for b in batches] == [("q0:1", "q0:2")]


def test_max_batch_kv_bytes_caps_batches_below_the_budget():
    batches = make_batches(wide_graph(4), ctx(max_batch_kv_bytes=14), max_size=8)
    assert [len(b.nodes) for b in batches if b.model == "small"] == [2, 2]


# --- levels and level_schedule ----------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_topo_order_and_levels_respect_every_edge(seed, n_queries):
    g = random_graph(random.Random(seed), EXPERTS, n_queries=n_queries, min_sub=1)
    position = {nid: i for i, nid in enumerate(topo_order(g))}
    assert sorted(position) == sorted(g.nodes)
    levels = topo_levels(g)
    for node in g:
        assert all(levels[p] < levels[node.id] and position[p] < position[node.id] for p in node.parents)


def test_level_order_chains_models_across_levels():
    g = Graph()
    add_query(g, "q0", "x", [Sq(1, "a", (), "general"), Sq(2, "b", (), "law"), Sq(3, "c #1 #2", (1, 2), "law"),
                             Sq(4, "d #1 #2", (1, 2), "general")], "aggregator", final=FinalAnswer.model)
    batches = make_batches(g, ctx(), max_size=8)
    models = [batches[i].model for i in order_batches(batches)]
    assert models == ["small", "big", "big", "small", "big"]  # level 1 starts with big, where level 0 ended


def test_belady_beats_lru_on_cyclic_reuse():
    sizes = {"a": 1, "b": 1, "c": 1}
    uses = list("abcabca")
    loads = {pol: sum(e.op is Op.LOAD for e in plan_residency(uses, sizes, {}, 2, pol)) for pol in ResidencyPolicy}
    assert loads == {ResidencyPolicy.belady: 5, ResidencyPolicy.lru: 7}
    assert sum(e.op is Op.LOAD for e in plan_residency(uses, sizes, {}, float("inf"), ResidencyPolicy.belady)) == 3


def test_a_load_transient_and_initially_resident_models_count_against_the_capacity():
    sizes = {"a": 10, "b": 10}
    # b's load needs 10 + 5 transient: with a resident from the start (10), a 24-byte capacity must evict a first
    events = plan_residency(["b", "a"], sizes, {"b": 5}, 24, ResidencyPolicy.belady, initial=("a",))
    assert [(e.op.value, e.model) for e in events] == [("evict", "a"), ("load", "b"), ("run", "b"), ("load", "a"),
                                                      ("run", "a")]  # a's own load has no transient: both fit
    events = plan_residency(["b", "a"], sizes, {"b": 5}, 25, ResidencyPolicy.belady, initial=("a",))
    assert [(e.op.value, e.model) for e in events] == [("load", "b"), ("run", "b"), ("run", "a")]


# --- pass manager ---------------------------------------------------------------------------------

def test_pass_manager_times_dumps_and_disables(tmp_path):
    g = Graph()
    france(g, "q0", Sq(2, "x", (), "law"))
    france(g, "q1", Sq(2, "y", (), "law"))
    pm = PassManager(["dedupe", "fuse", "batch", "schedule", "residency"], disabled={"fuse"}, dump_dir=tmp_path)
    out = pm.run(g, ctx())
    assert list(pm.timings) == ["dedupe", "batch", "schedule", "residency"]
    assert [name for name, _ in pm.dumps] == ["input", "dedupe", "batch", "schedule", "residency"]
    assert "aliases:\n  q1:1 -> q0:1" in pm.dumps[1][1]
    assert "batch 0 level=0 model=small" in pm.dumps[2][1]
    assert "schedule: batches 0" in pm.dumps[3][1]
    assert "residency policy=belady" in pm.dumps[4][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.txt", "01-dedupe.txt", "02-batch.txt",
                                                         "03-schedule.txt", "04-residency.txt"]
    assert {"schedule", "residency"} <= set(out.annotations)


def test_unknown_pass_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown compiler pass 'dedup'; known: batch, cascade, dedupe"):
        PassManager(["dedup"])
    with pytest.raises(ConfigError, match="unknown compiler pass 'nope'"):
        check_pipeline(["dedupe"], ["nope"])


@pytest.mark.parametrize("passes, disabled, message", [
    # the review's case: dedupe after batch dropped the batches and the plan silently ran 7 single calls
    (["batch", "dedupe", "schedule", "residency"], [],
     "'dedupe' runs after 'batch' and invalidates its 'batches': put 'dedupe' before 'batch'"),
    (["batch", "dedupe"], [], "'dedupe' runs after 'batch'"),
    (["fuse", "batch", "residency", "schedule"], [], "pass 'residency' needs 'schedule', which no earlier pass "
                                                     "provides: add 'schedule' before it"),
    (["dedupe", "schedule", "residency"], [], "pass 'schedule' needs 'batches'.*add 'batch' before it"),
    (["batch", "schedule", "residency"], ["batch"], "'batch' is disabled; to run every node alone set "
                                                     "compiler.max_batch_size=1 compiler.max_call_size=1"),
    (["batch", "schedule"], [], "lowering needs 'residency'"),
    (["batch", "schedule", "residency"], ["dedupe"], "compiler.disabled names 'dedupe', which is not in"),
])
def test_misordered_or_incomplete_pipelines_are_refused_naming_the_passes(passes, disabled, message):
    with pytest.raises(PipelineError, match=message):
        check_pipeline(passes, disabled)
    with pytest.raises(PipelineError):
        PassManager(passes, disabled)


def broken_pass(name: str, in_place: bool) -> Pass:
    def run(graph, ctx):
        out = graph if in_place else graph.copy()
        first = next(iter(out.nodes.values()))
        out.nodes[first.id] = first.with_(inputs={"#9": first.id}, template="loop {#9}")
        return out
    return Pass(name, run)


NOTHING = frozenset()  # pipelines of these tests are not lowered


@pytest.mark.parametrize("in_place", [False, True])
def test_a_pass_that_breaks_an_invariant_is_named(in_place):
    g = wide_graph(2)
    pm = PassManager(["dedupe", broken_pass("evil", in_place), "batch"], then_requires=NOTHING)
    with pytest.raises(PassError, match=r"pass 'evil' broke an IR invariant: CycleError") as err:
        pm.run(g, ctx())
    assert isinstance(err.value.error, CycleError)


def test_invalid_input_keeps_the_verifier_error():
    g = wide_graph(1)
    g.nodes["q0:1"] = g.nodes["q0:1"].with_(inputs={"#1": "q0:agg"}, template="{#1}")
    with pytest.raises(CycleError):
        PassManager(["dedupe"], then_requires=NOTHING).run(g, ctx())


def test_a_pass_returning_no_graph_is_named():
    with pytest.raises(PassError, match="pass 'lazy'.*not a Graph"):
        PassManager([Pass("lazy", lambda graph, ctx: None)], then_requires=NOTHING).run(wide_graph(1), ctx())
