"""editing.generate.decode: several requests decoded as one batch give what each gives alone.

Tiny random models (tests/tiny.py) in fp32 on CPU. Left padding changes the shapes of the matrix
products, so logits may differ from the unbatched ones in their last bits; the tests assert that the
tokens (hence texts, counts, finish reasons) are equal, for greedy decoding and for seeded sampling
(each request samples from its own generator).
"""

from __future__ import annotations

import pytest
import torch

from editing.generate import Request, complete, decode
from tests.tiny import tiny_gpt2, tiny_llama

PROMPTS = [
    "The Eiffel Tower is in",
    "Berlin",
    "The mother tongue of Danielle Darrieux is French. Michel Rocard is a native speaker of",
    "Apple was founded by Steve",
    "Where is the Eiffel Tower? It stands in the city of",
    "Toko",
]


@pytest.fixture(scope="module", params=["llama-metaspace", "llama-bytelevel", "gpt2"])
def lm(request):
    torch.set_num_threads(1)
    return {"llama-metaspace": lambda: tiny_llama("metaspace"), "llama-bytelevel": lambda: tiny_llama(),
            "gpt2": lambda: tiny_gpt2("metaspace")}[request.param]()


def mixed_requests(lm, seeds: bool = False) -> list[Request]:
    """Mixed prompt lengths and token limits; a stop string that really stops some rows (taken from
    what the model says alone), one that never occurs."""
    requests = []
    for i, prompt in enumerate(PROMPTS):
        r = Request([prompt], max_new_tokens=[12, 3, 20, 8, 16, 1][i], seed=100 + i if seeds else None)
        requests.append(r)
    # a stop string from the middle of what request 0 says alone: it must cut there, batched too
    alone = complete(lm, [PROMPTS[0]], max_new_tokens=12, temperature=1.0 if seeds else 0.0, seed=100)[0].text
    requests[0].stop = [alone[len(alone) // 2: len(alone) // 2 + 2]]
    requests[2].stop = ["\u2603 never"]
    return requests


def alone(lm, requests: list[Request], temperature: float = 0.0, top_p: float = 1.0):
    return [decode(lm, [r], temperature, top_p)[0] for r in requests]


def test_greedy_batch_equals_each_request_alone(lm):
    requests = mixed_requests(lm)
    expected = alone(lm, requests)
    assert decode(lm, requests) == expected
    assert decode(lm, requests[::-1]) == expected[::-1]  # order in the batch does not matter
    assert expected[0][0].finish_reason == "stop" and expected[0][0].tokens < 12  # the stop string cut it
    for r, (c,) in zip(requests[1:], expected[1:]):  # each its own token limit, unless EOS came first
        assert c.tokens == r.max_new_tokens if c.finish_reason == "length" else c.tokens < r.max_new_tokens


def test_seeded_sampling_batch_equals_each_request_alone(lm):
    requests = mixed_requests(lm, seeds=True)
    expected = alone(lm, requests, temperature=0.9, top_p=0.95)
    assert decode(lm, requests, temperature=0.9, top_p=0.95) == expected
    # with other company in the batch (other prompts, one unseeded), request 3 samples the same
    company = [Request(["Madrid is in Spain,"], 10), requests[3], Request(["London"], 4, seed=7)]
    assert decode(lm, company, temperature=0.9, top_p=0.95)[1] == expected[3]
    # and the seed matters: other seeds sample something else (at least one of these differs)
    reseeded = [Request(r.prompts, r.max_new_tokens, r.stop, r.seed + 1000) for r in requests]
    assert decode(lm, reseeded, temperature=0.9, top_p=0.95) != expected


def test_greedy_equals_transformers_generate(lm):
    """The decoding loop is greedy search: the same tokens as transformers' own generate, unpadded."""
    tok = lm.tokenizer
    for prompt in PROMPTS[:4]:
        enc = tok(prompt, return_tensors="pt")
        ids = lm.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=None)[0, enc.input_ids.shape[1]:]
        ours = complete(lm, [prompt], max_new_tokens=10)[0]
        n = ours.tokens
        assert ours.text == tok.decode(ids[:n], skip_special_tokens=True)
        if ours.finish_reason == "length":
            assert n == 10


def test_streams_and_early_results_per_request_in_one_batch(lm):
    chunks: dict[int, list[str]] = {0: [], 1: []}
    finished: list[int] = []
    requests = [
        Request([PROMPTS[2]], 20, on_text=chunks[0].append, on_done=lambda c: finished.append(0)),
        Request([PROMPTS[0]], 2, on_text=chunks[1].append, on_done=lambda c: finished.append(1)),
        Request([PROMPTS[3], PROMPTS[5]], 6, on_done=lambda c: finished.append(2)),  # two prompts, one request
    ]
    out = decode(lm, requests)
    assert "".join(chunks[0]) == out[0][0].text and "".join(chunks[1]) == out[1][0].text
    assert finished[0] == 1 and sorted(finished) == [0, 1, 2]  # the 2-token request was answered first
    assert out[2] == [complete(lm, [PROMPTS[3]], 6)[0], complete(lm, [PROMPTS[5]], 6)[0]]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_requests_joining_a_running_batch_equal_each_request_alone(lm, temperature):
    """Continuous batching: requests handed in between decoding steps (shorter and longer prompts than the
    running rows) decode as they do alone, and so do the rows they join."""
    requests = mixed_requests(lm, seeds=temperature > 0)
    expected = alone(lm, requests, temperature, top_p=0.95)
    arrivals = {1: [requests[2]], 2: [requests[4], requests[5]], 5: [requests[3]]}  # step -> joining requests
    step, done = [0], {}
    for i, r in enumerate(requests):
        r.on_done = lambda c, i=i: done.__setitem__(i, c)

    def more() -> list[Request]:
        step[0] += 1
        return arrivals.get(step[0], [])

    out = decode(lm, requests[:2], temperature, top_p=0.95, more=more)
    assert step[0] >= 5  # every arrival joined before the batch ran out
    assert len(out) == 6 and sorted(done) == list(range(6))
    assert [done[i] for i in range(6)] == expected


def test_bad_requests_are_refused():
    lm = tiny_llama("metaspace")
    with pytest.raises(ValueError, match="one prompt at a time"):
        decode(lm, [Request(["a", "b"], 4, on_text=print)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode(lm, [Request(["a"], 0)])


@pytest.mark.integration
def test_smollm2_greedy_batch_equals_each_request_alone(smollm2):
    """The real model: a batch of mixed prompt lengths and limits (padding up to 9 tokens) gives the
    tokens each request gives alone."""
    prompts = ["The Eiffel Tower is", "The capital of France is", "Michel Rocard is a native speaker of",
               "Water", "The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"]
    requests = [Request([p], max_new_tokens=12 - i, stop=["."] if i % 2 else []) for i, p in enumerate(prompts)]
    assert decode(smollm2, requests) == alone(smollm2, requests)
