"""Turning (prompt, target) text pairs into token ids, and batches of them.

The target's leading space is handled here, once, by how the tokenizer behaves: the
target is tokenized as the continuation of `prompt + " " + target` (the tokens the model
would really see after the prompt), which is right for GPT-2-style byte-level BPE
(SmolLM2: " English" is one token, "English" another) and for SentencePiece-style
tokenizers (where the space becomes a "▁" prefix) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def join(prompt: str, target: str) -> str:
    """The text of prompt followed by target, with exactly one separating space."""
    if not prompt or prompt.endswith((" ", "\n")) or target.startswith((" ", "\n")):
        return prompt + target
    return prompt + " " + target


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the target as it continues the prompt."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    full_ids = tokenizer(join(prompt, target), add_special_tokens=True).input_ids
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids) :]
    # The prompt's last token merged with the target's first (rare with a separating
    # space): tokenize the target on its own, spaced as it would follow the prompt.
    target_ids = tokenizer(join("x", target)[1:], add_special_tokens=False).input_ids
    if not target_ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return prompt_ids, target_ids


@dataclass
class PairBatch:
    """Right-padded prompt+target sequences and where their target tokens sit.

    Position j of `rows/cols` is the logit position that predicts target token `labels[j]`
    (one position before the token itself), so `logits[rows, cols]` is (N, vocab).
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    rows: torch.Tensor  # (N,) batch row of each target token
    cols: torch.Tensor  # (N,) position whose logits predict it
    labels: torch.Tensor  # (N,) the target token ids
    seq_of_token: torch.Tensor  # (N,) which pair each target token belongs to
    subject_mask: torch.Tensor  # (B, L) bool: the subject's tokens (all prompt tokens if none given)

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in vars(self).values()))

    def first_targets(self, pairs: range) -> torch.Tensor:
        """(R,) the index into `labels` of each of these pairs' first target token (pair order)."""
        seq = self.seq_of_token  # (N,)
        first = torch.ones_like(seq, dtype=torch.bool)
        first[1:] = seq[1:] != seq[:-1]
        return torch.nonzero(first & (seq >= pairs.start) & (seq < pairs.stop)).squeeze(1)


def subject_positions(tokenizer, prompt: str, subject: str | None, last_only: bool) -> list[int]:
    """Indices of the prompt tokens that spell `subject` (its last one if `last_only`).

    Found through the tokenizer's character offsets; an absent subject (or none given)
    yields every prompt token, which leaves the edit unrestricted.
    """
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    everything = list(range(len(enc.input_ids)))
    start = prompt.find(subject) if subject else -1
    if start < 0 and subject:
        start = prompt.lower().find(subject.lower())
    if start < 0:
        return everything
    end = start + len(subject)
    inside = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > start and a < end and b > a]
    if not inside:
        return everything
    return inside[-1:] if last_only else inside


def pair_batch(
    tokenizer,
    pairs: list[tuple[str, str]],
    prompt_last: bool = False,
    subjects: list[str | None] | None = None,
    subject_last: bool = False,
    append_eos: bool = False,
) -> PairBatch:
    """Batch (prompt, target) pairs.

    prompt_last=False: teacher forcing on prompt + target (FT-M, LoRA, the metrics).
    prompt_last=True: the sequence is the prompt alone and every target token is scored
    from the distribution at the last prompt position (EasyEdit's FT-L `prompt_last`).
    append_eos: the tokenizer's EOS becomes one more target token (training only: the
    answer should end there; the metrics score the target's own tokens).
    """
    encoded = [encode_pair(tokenizer, p, t) for p, t in pairs]
    if append_eos and tokenizer.eos_token_id is not None:
        encoded = [(pi, ti + [tokenizer.eos_token_id]) for pi, ti in encoded]
    seqs = [pi if prompt_last else pi + ti for pi, ti in encoded]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    subject_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    rows, cols, labels, owner = [], [], [], []
    for i, ((prompt_ids, target_ids), seq) in enumerate(zip(encoded, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        if subjects is not None:
            subject_mask[i, subject_positions(tokenizer, pairs[i][0], subjects[i], subject_last)] = True
        for k, tid in enumerate(target_ids):
            rows.append(i)
            cols.append(len(prompt_ids) - 1 if prompt_last else len(prompt_ids) - 1 + k)
            labels.append(tid)
            owner.append(i)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PairBatch(
        input_ids, attention_mask, as_long(rows), as_long(cols), as_long(labels), as_long(owner), subject_mask
    )
