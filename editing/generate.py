"""Text generation from the model as it stands (whatever version is checked out).

Batched (left padding), greedy when temperature is 0, with stop strings, seeds, per-row
finish reasons, and a token streamer that hands text deltas to a callback (the worker
appends them to a Redis stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from editing.model import LoadedModel


@dataclass
class Completion:
    text: str
    tokens: int  # generated tokens (up to and excluding an end-of-sequence token)
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopOnStrings(StoppingCriteria):
    """Ends each row once its generated text contains one of the stop strings."""

    def __init__(self, tokenizer, prompt_len: int, stop: list[str]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, [s for s in stop if s]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


class TextDeltaStreamer(BaseStreamer):
    """Decodes one row's new tokens as they come and calls `on_text(delta)` with text that is final:
    complete characters, cut at a stop string, holding back what could still become one."""

    def __init__(self, tokenizer, stop: list[str], on_text: Callable[[str], None]):
        self.tokenizer, self.stop, self.on_text = tokenizer, [s for s in stop if s], on_text
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.stopped:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text, hit = cut_at_stop(text, self.stop)
        if hit:
            self.stopped = True
        elif not final:
            text = text[: max(self.sent, len(text) - self.hold)] if self.hold else text
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                text = text[:-1]
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


@torch.no_grad()
def complete(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    on_text: Callable[[str], None] | None = None,
    add_special_tokens: bool = True,
) -> list[Completion]:
    """Continue every prompt in one batch (left padding); greedy when temperature is 0.
    `on_text` streams the text of a single prompt as it is generated."""
    tok, model = lm.tokenizer, lm.model
    stop = [s for s in (stop or []) if s]
    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming serves one prompt at a time")
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(lm.device)
    finally:
        tok.padding_side = side
    prompt_len = enc.input_ids.shape[1]
    if seed is not None:
        torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
        stopping_criteria=StoppingCriteriaList([StopOnStrings(tok, prompt_len, stop)]) if stop else None,
        streamer=TextDeltaStreamer(tok, stop, on_text) if on_text is not None else None,
    )
    eos = tok.eos_token_id
    completions = []
    for row, mask in zip(out[:, prompt_len:], enc.attention_mask):
        ids = row.tolist()
        n = ids.index(eos) if eos is not None and eos in ids else len(ids)
        text, hit = cut_at_stop(tok.decode(ids[:n], skip_special_tokens=True), stop)
        reason = "stop" if hit or n < len(ids) else "length"
        completions.append(Completion(text, n, int(mask.sum()), reason))
    return completions


def generate(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """The completions' texts only."""
    return [c.text for c in complete(lm, prompts, max_new_tokens, temperature, top_p, seed)]
