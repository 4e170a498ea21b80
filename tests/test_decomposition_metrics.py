"""decomposition_quality against hand-made gold DAGs."""
import pytest

from compllm.data.decomposition import decomposition_quality
from compllm.data.fanoutqa import GoldSubQuestion


def G(id, q, deps=()):
    return GoldSubQuestion(id, q, (), tuple(deps))


# "Which vitamin is lacking in scurvy, and what is the population of the capital of the country of Pele?"
GOLD = (
    G("v", "Which vitamin is lacking in scurvy?"),
    G("c", "What country is Pele from?"),
    G("k", "What is the capital of Brazil?", ["c"]),
    G("p", "What is the population of Brasilia?", ["k"]),
)


def test_identical_decomposition_scores_one():
    pred = [("Which vitamin is lacking in scurvy?", []), ("What country is Pele from?", []),
            ("What is the capital of Brazil?", [2]), ("What is the population of Brasilia?", [3])]
    q = decomposition_quality(pred, GOLD)
    assert (q["n_pred"], q["n_gold"], q["n_matched"]) == (4, 4, 4)
    assert q["node_f1"] == 1.0 and q["mean_matched_f1"] == 1.0
    assert (q["edge_precision"], q["edge_recall"], q["edge_f1"]) == (1.0, 1.0, 1.0)
    assert q["matching"] == [(1, "v", 1.0), (2, "c", 1.0), (3, "k", 1.0), (4, "p", 1.0)]


def test_matching_is_optimal_not_greedy_and_order_free():
    # Paraphrased and shuffled; a greedy first-come matching would give pred 1 the gold "c" and strand "k".
    pred = [("What is the capital of the country Pele is from?", []), ("Which country is Pele from?", []),
            ("How many people live in #1?", [1]), ("What vitamin does someone with scurvy lack?", [])]
    q = decomposition_quality(pred, GOLD, threshold=0.3)
    match = {p: g for p, g, _ in q["matching"]}
    assert match[1] == "k" and match[2] == "c" and match[4] == "v"


def test_transitive_edges_neither_help_nor_hurt():
    base = [("Which vitamin is lacking in scurvy?", []), ("What country is Pele from?", []),
            ("What is the capital of Brazil?", [2])]
    redundant = base + [("What is the population of Brasilia?", [2, 3])]  # 2 -> 4 is implied by 2 -> 3 -> 4
    q = decomposition_quality(redundant, GOLD)
    assert (q["edge_precision"], q["edge_recall"]) == (1.0, 1.0)
    # a predicted shortcut over an unpredicted gold node is right: gold has c -> k -> p
    skip = [("What country is Pele from?", []), ("What is the population of Brasilia?", [1])]
    q = decomposition_quality(skip, GOLD)
    assert q["n_matched"] == 2 and q["edge_precision"] == 1.0 and q["edge_recall"] == 1.0


def test_wrong_and_missing_edges():
    flat = [("Which vitamin is lacking in scurvy?", []), ("What country is Pele from?", []),
            ("What is the capital of Brazil?", []), ("What is the population of Brasilia?", [1])]
    q = decomposition_quality(flat, GOLD)
    assert q["n_pred_edges"] == 1 and q["n_correct_pred_edges"] == 0  # v -> p is not in the gold
    assert q["n_gold_edges"] == 2 and q["n_found_gold_edges"] == 0
    assert (q["edge_precision"], q["edge_recall"], q["edge_f1"]) == (0.0, 0.0, 0.0)
    half = [("Which vitamin is lacking in scurvy?", []), ("What country is Pele from?", []),
            ("What is the capital of Brazil?", [2]), ("What is the population of Brasilia?", [1])]
    q = decomposition_quality(half, GOLD)
    assert q["edge_precision"] == 0.5 and q["edge_recall"] == 0.5
    no_edges = [(t, []) for t, _ in half]
    q = decomposition_quality(no_edges, GOLD)
    assert q["edge_precision"] == 1.0 and q["edge_recall"] == 0.0 and q["edge_f1"] == 0.0


def test_extra_and_unmatched_nodes():
    pred = [("Which vitamin is lacking in scurvy?", []), ("Who painted the Mona Lisa?", []),
            ("What country is Pele from?", [])]
    q = decomposition_quality(pred, GOLD)
    assert q["n_matched"] == 2
    assert q["node_precision"] == pytest.approx(2 / 3) and q["node_recall"] == 0.5
    assert q["edge_precision"] == 1.0 and q["edge_recall"] == 1.0  # v and c are independent in both


def test_degenerate_inputs():
    q = decomposition_quality([], GOLD)
    assert q["n_matched"] == 0 and q["node_f1"] == 0.0 and q["edge_f1"] is None
    q = decomposition_quality([("What country is Pele from?", [])], GOLD)
    assert q["n_matched"] == 1 and q["edge_f1"] is None  # one node has no pair to order
    q = decomposition_quality([("What country is Pele from?", [1, 5, 0]), ("?!", [])], GOLD)
    assert q["invalid_pred_deps"] == 3 and q["n_matched"] == 1


def test_cycles_are_rejected():
    with pytest.raises(ValueError, match="cycle"):
        decomposition_quality([("a b", [2]), ("c d", [1])], GOLD)
    with pytest.raises(ValueError, match="unknown id"):
        decomposition_quality([("a", [])], [G("x", "a", ["y"])])
