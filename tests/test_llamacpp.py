"""The llama.cpp backend on the real shipped SmolLM2-135M GGUF (Q4_1): the hf backend's prompt ids, greedy batches
equal to batch 1 (rows joining mid-decode too), prefix reuse that changes nothing but the work, choice scoring,
cancellation at the next llama_decode, and eviction that frees the memory."""
import gc
import threading
import weakref

import pytest
from omegaconf import OmegaConf

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make setup-llamacpp`)")

from compllm.backends.base import BackendError, GenerationCancelled, GenerationRequest  # noqa: E402
from compllm.backends.llamacpp import LlamaCppModel, LlamaCppSettings  # noqa: E402
from compllm.backends.pool import ModelPool  # noqa: E402


def ask(question: str, max_new_tokens: int = 16, stop: tuple[str, ...] = (), system: str | None = None,
        choices: tuple[str, ...] = ()) -> GenerationRequest:
    messages = ({"role": "system", "content": system},) if system else ()
    return GenerationRequest(messages + ({"role": "user", "content": question},), max_new_tokens, stop, choices)


# different prompt lengths, limits and a stop string
REQUESTS = [ask("What is 15% of 240?", 10), ask("Write a long story about a dragon.", 16),
            ask("Is a verbal contract binding?", 24, stop=(".",)), ask("Name three fruits.", 6),
            ask("Explain photosynthesis in one paragraph for a child who is eight years old.", 12)]
SYSTEM = ("You answer questions for a small law firm. " + " ".join(
    f"Rule {i}: be brief, cite statute {i * 7} when it applies, and never invent facts about case {i}." for i in range(3)))


def pool(compose, model_cache, *overrides: str) -> ModelPool:
    cfg = compose("model=smollm2-135m-llamacpp", f"cache_dir={model_cache}", *overrides)
    return ModelPool(OmegaConf.to_container(cfg.models, resolve=True, enum_to_str=True), cache_dir=model_cache)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_settings_are_checked_before_anything_loads():
    with pytest.raises(BackendError, match="n_seq_max must be >= 2"):
        LlamaCppModel("x", "/nonexistent.gguf", LlamaCppSettings(n_seq_max=1))
    with pytest.raises(BackendError, match="threads"):
        LlamaCppModel("x", "/nonexistent.gguf", LlamaCppSettings(threads=0))


def test_hf_and_llamacpp_aliases_of_one_gguf_are_two_models(compose, model_cache):
    cfg = compose("model=smollm2-135m", f"cache_dir={model_cache}", "+model@models.fast=smollm2-135m-llamacpp")
    p = ModelPool(OmegaConf.to_container(cfg.models, resolve=True, enum_to_str=True), cache_dir=model_cache)
    assert p._key("default") != p._key("fast")


@pytest.mark.model
def test_prompt_ids_are_the_hf_backends(compose, model_cache):
    """The GGUF's chat template rendered with jinja2 and tokenized by llama.cpp gives the hf backend's prompt ids
    (its tokenizer is the one the GGUF converts to), with a default system prompt, a given one, and several turns."""
    from transformers import AutoTokenizer

    model = pool(compose, model_cache).get("default")
    tokenizer = AutoTokenizer.from_pretrained(str(model.path.rsplit("/", 1)[0]), gguf_file=model.path.rsplit("/", 1)[1])
    conversations = [REQUESTS[0], ask("Naïve Bayes — in 2 lines; `code` & <tags>, 🙂, 日本語.", system="Be terse."),
                     GenerationRequest(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                                        {"role": "user", "content": "  spaces\n\nand\ttabs  "}))]
    for request in conversations:
        text = tokenizer.apply_chat_template(list(request.messages), tokenize=False, add_generation_prompt=True)
        assert model.render(request) == text
        assert model.tokenize(model.render(request)) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert model._choice_token_ids(tuple("ABCD")) == [tokenizer.encode(c, add_special_tokens=False)[0] for c in "ABCD"]


@pytest.mark.model
def test_batched_greedy_equals_batch_one_also_with_rows_joining_mid_decode(compose, model_cache):
    model = pool(compose, model_cache).get("default")
    alone = [model.generate([r])[0] for r in REQUESTS]
    batched = model.generate(REQUESTS)
    assert [g.text for g in batched] == [g.text for g in alone]
    assert [g.output_tokens for g in batched] == [g.output_tokens for g in alone]
    assert all(g.output_tokens <= r.max_new_tokens for g, r in zip(batched, REQUESTS))
    assert batched[2].finish_reason == "stop" and batched[1].finish_reason == "length"
    # continuous refill: 2 rows live, the others prefilled and joining as rows leave
    refilled = model.generate(REQUESTS + REQUESTS[::-1], max_live_rows=2)
    assert [g.text for g in refilled] == [g.text for g in alone + alone[::-1]]
    assert model.stats.calls == len(REQUESTS) + 2
    assert model.stats.output_tokens == 4 * sum(g.output_tokens for g in alone)


@pytest.mark.model
def test_prefix_reuse_changes_the_work_not_the_tokens(compose, model_cache):
    """Rows sharing a system prompt prefill it once (and the next call reuses it); the tokens are those of a
    model without the prefix cache. The unified-KV layout reuses too (its answers may differ from batch 1)."""
    requests = [ask(q, 8, system=SYSTEM) for q in ("Can my landlord keep my deposit?", "What is a tort?",
                                                    "Is a verbal contract binding?")]
    plain = pool(compose, model_cache, "models.default.llamacpp.prefix_cache=false").get("default")
    expected = plain.generate(requests)
    assert all(g.cached_tokens == 0 for g in expected)
    assert plain.stats.extra["prefill_tokens_reused"] == 0
    del plain
    model = pool(compose, model_cache).get("default")
    shared = len(model.tokenize(model.render(ask("", system=SYSTEM)))) - 8  # the system turn, at least
    got = model.generate(requests)
    assert [g.text for g in got] == [g.text for g in expected]
    # computed once, for the first row: the others reuse it
    assert got[0].cached_tokens == 0 and all(g.cached_tokens >= shared for g in got[1:])
    computed = model.stats.extra["prefill_tokens_computed"]
    assert model.stats.extra["prefill_tokens_reused"] == sum(g.cached_tokens for g in got)
    assert computed + sum(g.cached_tokens for g in got) == sum(g.prompt_tokens for g in got)
    # the phase timers: prefill counts the computed prompt tokens, decode one token per live row per step
    assert model.stats.prefill_tokens == computed and model.stats.prefill_seconds > 0
    # (a row's last token is fed again only when it did not end the row: an end of sequence comes from its logits)
    assert sum(g.output_tokens - 1 for g in got) <= model.stats.decode_tokens <= sum(g.output_tokens for g in got)
    assert model.stats.decode_seconds > 0
    again = model.generate([ask("What is a lien?", 8, system=SYSTEM)])[0]  # a later call reuses the cached prefix
    assert again.cached_tokens >= shared
    assert again.text == plain_text(compose, model_cache, ask("What is a lien?", 8, system=SYSTEM))
    unified = LlamaCppModel("unified", model.path, LlamaCppSettings(kv_unified=True))
    answers = unified.generate(requests)
    assert all(g.cached_tokens >= shared and g.text for g in answers[1:])


def plain_text(compose, model_cache, request: GenerationRequest) -> str:
    return pool(compose, model_cache, "models.default.llamacpp.prefix_cache=false").get("default").generate([request])[0].text


@pytest.mark.model
def test_choice_is_the_option_with_the_highest_first_token_logit(compose, model_cache):
    import numpy as np

    model = pool(compose, model_cache).get("default")
    choice = ask("Which organ makes insulin? Options: (A) liver (B) pancreas (C) heart (D) lung.", 1,
                 choices=("A", "B", "C", "D"))
    free = ask("What is 2+2?", 12)
    ids = model.tokenize(model.render(choice))
    L, batch = model._l, model._batch  # the prompt decoded by hand: all of it, logits for its last token
    for i, token in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, i == len(ids) - 1
        batch.seq_id[i][0] = 1
    batch.n_tokens = len(ids)
    assert L.llama_decode(model._ctx, batch) == 0
    logits = np.ctypeslib.as_array(L.llama_get_logits_ith(model._ctx, len(ids) - 1), shape=(model._n_vocab,))
    options = [model.tokenize(c, special=False)[0] for c in "ABCD"]
    expected = "ABCD"[int(logits[options].argmax())]
    L.llama_memory_seq_rm(model._mem, 1, -1, -1)
    got_choice, got_free = model.generate([choice, free])
    assert got_choice.text == expected and got_choice.output_tokens == 1
    assert got_free.text == model.generate([free])[0].text


class CancelAfter(threading.Event):
    """Set from the `n`-th time it is checked on: tells exactly how many llama_decode calls ran."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.checks = n, 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n or super().is_set()


@pytest.mark.model
def test_a_cancelled_call_stops_at_its_next_decode(compose, model_cache):
    model = pool(compose, model_cache).get("default")
    expected = model.generate([REQUESTS[3]])[0].text
    long = ask("Write a very long story about a dragon.", 400)
    cancel = CancelAfter(12)
    with pytest.raises(GenerationCancelled, match=r"after (\d+) tokens"):
        model.generate([long, ask("Say hi.", 400)], cancel=cancel)
    assert cancel.checks == 12  # checked before every llama_decode, and nothing ran after it was set
    assert model.cached_prefix_tokens == 0  # a failed call leaves no half-built state behind
    cancel = threading.Event()  # a timer, as the executor's timeout does
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(GenerationCancelled):
        model.generate([long], cancel=cancel)
    assert model.generate([REQUESTS[3]])[0].text == expected  # still usable, same answer


@pytest.mark.model
def test_evict_frees_the_model_and_its_memory(compose, model_cache):
    p = pool(compose, model_cache)
    gc.collect()
    before = rss_bytes()
    model = p.get("default")
    assert model.generate([REQUESTS[3], ask("Pick one.", 1, choices=("A", "B"))])[1].text in ("A", "B")
    held = model.resident_bytes
    assert held > model.weight_bytes > 50e6  # SmolLM2's Q4_1 tensors, plus the KV cache
    loaded = rss_bytes()
    assert loaded - before > held / 2
    gone = weakref.ref(model)
    del model
    p.evict("default")
    gc.collect()
    assert gone() is None and not p.loaded()
    assert loaded - rss_bytes() > held / 2, "evicting the model did not give its memory back"


@pytest.mark.model
def test_qwen_batch_of_eight_equals_batch_one(compose, model_cache):
    """Qwen2.5's Q4_K_M mixes K-quants, Q5_0 and Q8_0: 8 rows is where ggml switches to its tiled K-quant matmul,
    which the default settings keep off so that the batch cannot change the answers."""
    from compllm.models.errors import MissingPackageError

    p = ModelPool(OmegaConf.to_container(
        compose("model=qwen2.5-coder-0.5b-llamacpp", f"cache_dir={model_cache}").models, resolve=True,
        enum_to_str=True), cache_dir=model_cache)
    try:
        model = p.get("default")
    except MissingPackageError as exc:
        pytest.skip(f"the Qwen2.5-Coder-0.5B packages are not installed: {exc}")
    topics = ["a dragon", "a lighthouse", "a robot", "two chefs", "a library", "a village", "a clock", "a ship"]
    requests = [ask(f"Write a story about {t}.", n) for t, n in zip(topics, (12, 8, 16, 10, 14, 9, 16, 11))]
    assert [g.text for g in model.generate(requests)] == [model.generate([r])[0].text for r in requests]


def test_shared_groups_and_the_prefix_store():
    """Rows of two experts (two system prompts) on one model split into two groups, one prefix each (what all rows
    share, the template head, is too short to count); the store finds the saved prefix sharing the most tokens with
    a prompt, and drops the least recently used state past its byte limit, never a pinned one."""
    from compllm.backends.prefixes import PrefixStore, shared_groups

    head, law, med = [1, 2], [1, 2, 10, 11, 12, 13], [1, 2, 20, 21, 22, 23]
    rows = [law + [30, 31, 32], med + [60, 61, 62], law + [40, 41, 42], law + [50, 51, 52], med + [70, 71]]
    assert shared_groups(rows, 4, 2) == [(law, [0, 2, 3]), (med, [1, 4])]
    assert shared_groups(rows, 2, 2) == [(head, [0, 2, 3, 1, 4]), (law, [0, 2, 3]), (med, [1, 4])]  # nested
    assert shared_groups(rows, 8, 2) == []  # nothing shared by 8 tokens
    assert shared_groups([med + [70, 71]] * 2, 4, 2) == [(med, [0, 1])]  # each row keeps 2 tokens of its own
    store = PrefixStore(max_bytes=10)
    store.put(law, b"L" * 4)
    store.put(med + [60, 61, 62], b"M" * 4)
    assert store.best(law + [99], 99) == (tuple(law), len(law))
    assert store.best(med + [60, 99], 99) == (tuple(med + [60, 61, 62]), len(med) + 1)  # partial: truncated later
    assert store.best(head + [5], 99)[1] == 2 and store.best([7], 99) == (None, 0)
    store.put([5, 6], b"X" * 4, pinned={tuple(law)})  # 12 bytes > 10: the oldest unpinned state goes
    assert store.best(med, 99)[1] == 2 and store.best(law, 99)[1] == len(law) and len(store) == 2


def test_every_experts_prefix_is_kept_and_reused_across_calls(compose, model_cache):
    """One call, rows of two system prompts interleaved: each system prompt is computed once (for its first row) and
    reused by the other; both stay saved, so a later call of either expert reuses its own; the rows' cached_tokens
    add up to the backend's reused counter; the answers are those of a model without the prefix cache."""
    other = "You answer questions for a hospital. Be brief and never give a dosage without a source."
    requests = [ask("What is a tort?", 6, system=SYSTEM), ask("What is anemia?", 6, system=other),
                ask("What is a lien?", 6, system=SYSTEM), ask("What is a fever?", 6, system=other)]
    later = [ask("What is a deed?", 6, system=SYSTEM), ask("What is a rash?", 6, system=other)]
    plain = pool(compose, model_cache, "models.default.llamacpp.prefix_cache=false").get("default")
    expected = [g.text for g in plain.generate(requests)] + [g.text for g in plain.generate(later)]
    del plain
    model = pool(compose, model_cache).get("default")
    law = len(model.tokenize(model.render(ask("", system=SYSTEM)))) - 8
    med = len(model.tokenize(model.render(ask("", system=other)))) - 8
    got = model.generate(requests)
    assert got[0].cached_tokens == 0 and got[1].cached_tokens < med  # (the prompts' common head is reused)
    assert got[2].cached_tokens >= law and got[3].cached_tokens >= med
    assert model.stats.extra["prefill_tokens_reused"] == sum(g.cached_tokens for g in got)
    assert model.cached_prefixes >= 2
    again = model.generate(later)
    assert again[0].cached_tokens >= law and again[1].cached_tokens >= med
    assert [g.text for g in got + again] == expected
    total = sum(g.prompt_tokens for g in got + again)
    assert model.stats.extra["prefill_tokens_reused"] + model.stats.extra["prefill_tokens_computed"] == total
