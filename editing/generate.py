"""Text generation from the model as it stands (whatever version is checked out).

One decoding loop serves a batch of requests at once (`decode`): the prompts are left-padded into one
batch (attention mask, positions counted from each row's first real token), and each row stops on
its own (its request's token limit, a stop string, an end-of-sequence token); finished rows leave the
batch. Greedy when the temperature is 0; otherwise each request samples from its own
`torch.Generator` (seeded by the request's seed), so that a request's output does not depend on what
else shares its batch. `on_text` streams a single-prompt request's text as it is decoded.
`on_done` hands a request its completions as soon as its own rows are finished, while the rest of the
batch decodes on, and requests may join a running batch between two steps (`more`: continuous
batching). `complete` is the one-request form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from editing.model import LoadedModel


@dataclass
class Completion:
    text: str
    tokens: int  # generated tokens (up to and excluding an end-of-sequence token)
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"


@dataclass
class Request:
    """One request's prompts (rows of the batch) and what is its own: token limit, stop strings,
    seed, streaming callback, whether the tokenizer adds special tokens (not for chat templates)."""

    prompts: list[str]
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    add_special_tokens: bool = True
    on_done: Callable[[list[Completion]], None] | None = None  # called once its rows are all finished


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TextDeltaStreamer:
    """Decodes one row's new tokens as they come and calls `on_text(delta)` with text that is final:
    complete characters, cut at a stop string, holding back what could still become one."""

    def __init__(self, tokenizer, stop: list[str], on_text: Callable[[str], None]):
        self.tokenizer, self.stop, self.on_text = tokenizer, [s for s in stop if s], on_text
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def put(self, token_ids: list[int]) -> None:
        self.ids.extend(token_ids)
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


class _Row:
    """One prompt being decoded: its tokens so far and when it is done."""

    def __init__(self, tokenizer, prompt_ids: list[int], request: Request, generator: torch.Generator | None,
                 eos: set[int]):
        self.tokenizer, self.prompt_ids, self.eos, self.generator = tokenizer, prompt_ids, eos, generator
        self.limit = request.max_new_tokens
        self.stop = [s for s in request.stop if s]
        self.streamer = TextDeltaStreamer(tokenizer, self.stop, request.on_text) if request.on_text else None
        self.ids: list[int] = []
        self.finish_reason: str | None = None

    def push(self, token: int) -> bool:
        """Take the next token; True once the row is finished."""
        if token in self.eos:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            if self.streamer is not None:
                self.streamer.put([token])
            if self.stop and cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop)[1]:
                self.finish_reason = "stop"
            elif len(self.ids) >= self.limit:
                self.finish_reason = "length"
        if self.finish_reason is not None and self.streamer is not None:
            self.streamer.end()
        return self.finish_reason is not None

    def completion(self) -> Completion:
        text, hit = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop)
        reason = "stop" if hit else (self.finish_reason or "length")
        return Completion(text, len(self.ids), len(self.prompt_ids), reason)


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    config_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return {int(i) for i in ids if i is not None}


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of one row (transformers' TopPLogitsWarper): keep the most probable tokens
    whose probabilities sum to top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[-1:] = False
    return logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # a fresh non-deterministic seed: unseeded requests differ
    else:
        g.manual_seed(seed)
    return g


def _validate(r: Request) -> None:
    if r.on_text is not None and len(r.prompts) != 1:
        raise ValueError("streaming serves one prompt at a time")
    if r.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {r.max_new_tokens}")


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros in front along `dim`, up to `width` (a mask: 0 = no token; keys and values: masked out)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Batch:
    """The rows being decoded together: their KV cache, attention mask (left-padded), last positions and
    next-token logits. Requests may join while it runs (`add`): their prompts are prefilled on their own
    and their cache rows left-padded to the batch's length."""

    def __init__(self, lm: LoadedModel, temperature: float, top_p: float):
        self.lm, self.temperature, self.top_p = lm, temperature, top_p
        self.eos = _eos_ids(lm)
        tok = lm.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos, default=0)
        self.requests: list[Request] = []
        self.rows: list[_Row] = []
        self.owner: list[int] = []  # row -> its request
        self.left: list[int] = []  # request -> rows not finished yet
        self.active: list[int] = []  # rows still decoding, in batch order
        self.cache = self.mask = self.last = self.logits = None

    def add(self, requests: list[Request]) -> None:
        tok, device = self.lm.tokenizer, self.lm.device
        for r in requests:
            _validate(r)
        new = []
        for r in requests:
            g = _generator(r.seed, device) if self.temperature > 0 else None
            rows = []
            for prompt in r.prompts:
                ids = tok(prompt, add_special_tokens=r.add_special_tokens).input_ids
                if not ids:
                    raise ValueError("a prompt must have at least one token")
                rows.append(_Row(tok, list(ids), r, g, self.eos))
            self.owner += [len(self.requests)] * len(rows)
            new += range(len(self.rows), len(self.rows) + len(rows))
            self.rows += rows
            self.requests.append(r)
            self.left.append(len(rows))
        if new:
            self._prefill(new)

    def _prefill(self, new: list[int]) -> None:
        width = max(len(self.rows[i].prompt_ids) for i in new)
        input_ids = torch.full((len(new), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for k, i in enumerate(new):
            ids = self.rows[i].prompt_ids
            input_ids[k, width - len(ids):] = torch.tensor(ids)
            mask[k, width - len(ids):] = 1
        input_ids, mask = input_ids.to(self.lm.device), mask.to(self.lm.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        if self.cache is None:
            self.cache, self.mask, self.last, self.logits = out.cache, mask, positions[:, -1:], logits
        else:  # join the running batch: pad both to one length, rows after the running ones
            length = max(self.mask.shape[1], mask.shape[1])
            for running, joining in zip(self.cache.layers, out.cache.layers):
                running.keys = torch.cat([_left_pad(running.keys, length, -2), _left_pad(joining.keys, length, -2)])
                running.values = torch.cat([_left_pad(running.values, length, -2),
                                            _left_pad(joining.values, length, -2)])
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            self.last = torch.cat([self.last, positions[:, -1:]])
            self.logits = torch.cat([self.logits, logits])
        self.active += new

    def joinable(self) -> bool:
        """Rows can join a running batch when every cache layer is a plain growing one (no sliding window)."""
        from transformers.cache_utils import DynamicLayer

        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def _trim(self) -> None:
        """Drop the leading cache positions that no remaining row attends to (padding left behind by rows
        that were longer): a batch that requests keep joining does not grow without end."""
        if not self.joinable():
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def _choose(self) -> torch.Tensor:
        if self.temperature <= 0:
            return self.logits.argmax(-1)
        chosen = []
        for k, i in enumerate(self.active):
            row_logits = self.logits[k] / self.temperature
            if self.top_p < 1.0:
                row_logits = _top_p_filter(row_logits, self.top_p)
            chosen.append(torch.multinomial(row_logits.softmax(-1), 1, generator=self.rows[i].generator))
        return torch.cat(chosen)

    def _finished(self, row: int) -> None:
        i = self.owner[row]
        self.left[i] -= 1
        if self.left[i] == 0 and self.requests[i].on_done is not None:
            self.requests[i].on_done(self.completions(i))

    def completions(self, i: int) -> list[Completion]:
        return [row.completion() for row, o in zip(self.rows, self.owner) if o == i]

    def run(self, more: Callable[[], list[Request]] | None) -> None:
        device = self.lm.device
        while self.active:
            tokens = self._choose()
            keep = []
            for k, (i, t) in enumerate(zip(self.active, tokens.tolist())):
                if self.rows[i].push(t):
                    self._finished(i)
                else:
                    keep.append(k)
            if not keep:
                return
            if len(keep) < len(self.active):  # finished rows leave the batch
                index = torch.tensor(keep, device=device)
                self.cache.batch_select_indices(index)
                self.mask, self.last, tokens = self.mask[index], self.last[index], tokens[index]
                self.active = [self.active[k] for k in keep]
                self._trim()
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.active), 1))], dim=1)
            self.last = self.last + 1
            out = self.lm.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.last,
                                cache=self.cache, use_cache=True)
            self.cache, self.logits = out.cache, out.logits[:, -1, :].float()
            if more is not None and self.joinable():
                joining = more()
                if joining:
                    self.add(joining)


@torch.no_grad()
def decode(lm: LoadedModel, requests: list[Request], temperature: float = 0.0, top_p: float = 1.0,
           more: Callable[[], list[Request]] | None = None) -> list[list[Completion]]:
    """Continue every prompt of every request in one batch (left padding); greedy when temperature
    is 0. `more`, asked between decoding steps, may hand further requests (of the same temperature and
    top_p) that join the running batch (continuous batching). Returns every request's completions, in
    the order they came (those of `requests` first)."""
    batch = _Batch(lm, temperature, top_p)
    batch.add(requests)
    batch.run(more)
    return [batch.completions(i) for i in range(len(batch.requests))]


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
    request = Request(list(prompts), max_new_tokens, list(stop or []), seed, on_text, add_special_tokens)
    return decode(lm, [request], temperature, top_p)[0]


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
