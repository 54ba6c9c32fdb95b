import pytest

from editing.tokens import encode_pair, join, pair_batch, subject_positions
from tests.tiny import make_tokenizer


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_target_tokens_are_the_continuation_of_the_prompt(kind):
    tok = make_tokenizer(kind)
    prompt_ids, target_ids = encode_pair(tok, "The Eiffel Tower is in", "Paris")
    assert prompt_ids == tok("The Eiffel Tower is in").input_ids
    assert prompt_ids + target_ids == tok("The Eiffel Tower is in Paris").input_ids
    first = tok.convert_ids_to_tokens(target_ids)[0]
    assert first.startswith("Ġ" if kind == "bytelevel" else "▁")  # the space belongs to the target
    # A target given with its own leading space is not doubled.
    assert encode_pair(tok, "The Eiffel Tower is in", " Paris") == (prompt_ids, target_ids)


def test_join_adds_exactly_one_space():
    assert join("is in", "Paris") == "is in Paris"
    assert join("is in ", "Paris") == "is in Paris"
    assert join("is in", " Paris") == "is in Paris"


def test_pair_batch_positions_predict_the_target_tokens():
    tok = make_tokenizer("bytelevel")
    pairs = [("The Eiffel Tower is in", "Rome"), ("Berlin is the capital of", "Germany")]
    b = pair_batch(tok, pairs)
    for j in range(len(b.labels)):
        row, col = b.rows[j].item(), b.cols[j].item()
        assert b.input_ids[row, col + 1].item() == b.labels[j].item()  # next token is the label
    last = pair_batch(tok, pairs, prompt_last=True)
    prompt_len = len(tok(pairs[0][0]).input_ids)
    assert set(last.cols[last.seq_of_token == 0].tolist()) == {prompt_len - 1}


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_subject_positions(kind):
    tok = make_tokenizer(kind)
    prompt = "The mother tongue of Danielle Darrieux is"
    ids = tok(prompt).input_ids
    pos = subject_positions(tok, prompt, "Danielle Darrieux", last_only=False)
    text = tok.decode([ids[i] for i in pos])
    assert "Danielle" in text and "Darrieux" in text and "tongue" not in text
    assert subject_positions(tok, prompt, "Danielle Darrieux", last_only=True) == pos[-1:]
    # Missing subject: every prompt token (the edit is then unrestricted).
    assert subject_positions(tok, prompt, "Nobody", last_only=True) == list(range(len(ids)))
