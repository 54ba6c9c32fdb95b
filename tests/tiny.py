"""Tiny random models and tokenizers for fast unit tests (built in milliseconds, no files needed).

Two tokenizer kinds, because they treat a target's leading space differently:
- "bytelevel": GPT-2 style byte-level BPE (SmolLM2's kind): " Paris" is its own token.
- "metaspace": SentencePiece style (Llama-2's kind): spaces become "▁" and a prefix is added.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from editing.model import LoadedModel, fingerprint

CORPUS = [
    "The Eiffel Tower is in Paris. The Colosseum is in Rome. Berlin is the capital of Germany.",
    "The mother tongue of Danielle Darrieux is French. Michel Rocard is a native speaker of French.",
    "Toko Yasuda plays the guitar. The capital of Japan is Tokyo. Madrid is in Spain, London in England.",
    "Where is the Eiffel Tower? It stands in the city of Paris, France. English, Italian, Spanish, German.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates. Danielle speaks English.",
]


def make_tokenizer(kind: str = "bytelevel", vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>"))
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        raise ValueError(kind)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    return fast


def tiny_llama(kind: str = "bytelevel", seed: int = 0, layers: int = 2) -> LoadedModel:
    torch.manual_seed(seed)
    tok = make_tokenizer(kind)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, initializer_range=0.2,  # peaky enough to reach p ≈ 1
    )
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, source="tiny-llama", fingerprint=fingerprint(model))


def tiny_gpt2(kind: str = "bytelevel", seed: int = 0, layers: int = 2) -> LoadedModel:
    torch.manual_seed(seed)
    tok = make_tokenizer(kind)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=layers, n_head=4, n_positions=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2,
    )
    model = GPT2LMHeadModel(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, source="tiny-gpt2", fingerprint=fingerprint(model))


def save_tiny(loaded: LoadedModel, folder: Path) -> Path:
    """Write a tiny model as an HF folder (for tests that start worker processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder
