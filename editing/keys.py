"""Keys: what an edited module reads at a fact's positions, and the statistics of ordinary keys.

Used by ft-k (below) and by the locate-then-edit methods (editing/locate.py), whose C₀ =
E[k kᵀ] over generic text (`second_moment`) says which directions ordinary inputs use.

A fact is written along its key k: the module's input at the subject's last token. The
change ΔW = U K̃ᵀ answers to any input x with U (K̃ x), so how little it disturbs other
prompts depends on K̃. With K̃ = k (unit length) every input that shares k's large common
direction is moved too. Whitening by the inputs' second moment C = E[x xᵀ] (ROME/MEMIT's
C⁻¹k) makes K̃ small along the directions ordinary text uses: k̃ = C⁻¹k · |k| / (kᵀC⁻¹k),
scaled so that the key itself sees the same response |k| as unwhitened.

C is estimated once per module over generic text: short factual sentences written here,
plus the prose of Python's own reference topics (in every CPython, so nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

SENTENCES = """The capital of France is Paris. Mount Everest is the highest mountain on Earth.
The Amazon river flows through Brazil. William Shakespeare wrote Hamlet in London.
Toyota is a car manufacturer based in Japan. The Beatles were a rock band from Liverpool.
Albert Einstein was born in Germany and worked in Switzerland. The official language of Brazil is Portuguese.
Lionel Messi plays football for Argentina. The Louvre is a museum located in Paris.
Microsoft was founded by Bill Gates. The Nile is the longest river in Africa.
Marie Curie won the Nobel Prize in physics and chemistry. Tokyo is the largest city in Japan.
The Great Wall of China was built over many centuries. Google is headquartered in California.
Johann Sebastian Bach composed music for the organ. The mother tongue of Pablo Picasso was Spanish.
Canada shares a long border with the United States. The violin is a string instrument.
Barack Obama was the president of the United States. The Sahara is a desert in North Africa.
Honda produces motorcycles and cars. Leonardo da Vinci painted the Mona Lisa.
The Danube flows through Vienna and Budapest. BBC is a broadcaster in the United Kingdom.
Ronaldo is a professional soccer player from Portugal. Sydney is a city in Australia.
Nokia is a company from Finland. The headquarters of the United Nations is in New York.
Mozart was a composer from Salzburg. The Eiffel Tower was designed by Gustave Eiffel.
Apple released the first iPhone in 2007. Chess is a board game for two players.
Moscow is the capital of Russia. The Pacific is the largest ocean.
Samsung is an electronics company in South Korea. Dante wrote the Divine Comedy in Italian.
The Rhine flows into the North Sea. Kenya is a country in East Africa.
She works as a journalist for a newspaper. He was educated at the University of Oxford.
The film was directed by Steven Spielberg. The album was released by Columbia Records.
Their native language is Dutch. The team plays in the National Basketball Association."""


def generic_text(max_chars: int = 40_000) -> list[str]:
    """Short passages of ordinary text (no download): the sentences above, then reference prose."""
    passages = [s.strip() for s in SENTENCES.split("\n") if s.strip()]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down Python: the sentences alone
        return passages
    total = 0
    for text in topics.values():
        for para in re.split(r"\n\s*\n", text):
            if para.startswith(" ") or "::=" in para or "*****" in para or len(para) < 200:
                continue  # grammar rules, code samples and headings: keep prose only
            passages.append(" ".join(para.split()))
            total += len(passages[-1])
            if total > max_chars:
                return passages
    return passages


class _Enough(Exception):
    """Raised by a hook once every wanted input is read: the blocks above need not run."""


@torch.no_grad()
def module_inputs(model: torch.nn.Module, modules: dict[str, torch.nn.Module], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each module's input at the positions `mask` (B, L) marks: {name: (K, in)} in fp32. The
    forward stops once every module has been read (the blocks above it never run)."""
    found = {}

    def hook_for(name):
        def hook(module, args):
            found[name] = args[0][mask].float()  # (K, in)
            if len(found) == len(modules):
                raise _Enough

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return found


def source_passages(source: str, max_chars: int = 2_000_000) -> list[str]:
    """The text of a C₀ source: "builtin" (`generic_text`, works from any clone), or a path to a text
    file or a folder of them, e.g. WikiText-2 (`source_tag` names it in the moment cache)."""
    return generic_text() if source == "builtin" else _passages(_files(source), max_chars)


def source_tag(source: str) -> str:
    """The source's name in the moment cache: "builtin", or a hash of the path and of each file's name, size and
    mtime (its stat alone: a cached C₀ is found without reading the text)."""
    if source == "builtin":
        return "builtin"
    files = _files(source)
    stamp = ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
    return "text-" + hashlib.sha256(f"{Path(source).expanduser().resolve()}|{stamp}".encode()).hexdigest()[:12]


def _files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"C0 text source {source!r}: no such text file or folder of .txt files")
    return files


def _passages(files: list[Path], max_chars: int) -> list[str]:
    """The prose lines of `files`, up to `max_chars`: read line by line, so a large corpus is read no further."""
    passages, total = [], 0
    for f in files:
        with f.open(errors="replace") as lines:
            for line in lines:
                line = _WIKITEXT_ARTIFACTS.sub(lambda m: m.group(1), line).strip()
                if len(line) < 80 or line.startswith("="):  # blank lines and WikiText headings
                    continue
                passages.append(line)
                total += len(line)
                if total >= max_chars:
                    return passages
    return passages


def check_text_source(source: str) -> None:
    """OSError or ValueError where a C₀ source gives no text: missing, unreadable, or no line long enough to
    count as prose. Read before a model loads, so that a wrong source is reported at once, not by every edit."""
    if source != "builtin" and not source_passages(source):
        raise ValueError(f"C0 text source {source!r}: no line of 80 or more characters to read")


_WIKITEXT_ARTIFACTS = re.compile(r" @([.,-])@ ")  # WikiText's tokenized "3 @.@ 5" is "3.5"


def _input_sums(model: torch.nn.Module, tokenizer, modules: dict[str, torch.nn.Module], passages: list[str],
                max_tokens: int, chunk: int = 16) -> tuple[dict[str, torch.Tensor], int]:
    """Σ x xᵀ per module over `passages` (in, in), and the number of tokens read (≤ max_tokens)."""
    from tqdm import tqdm

    sums: dict[str, torch.Tensor] = {}
    count = 0
    device = next(model.parameters()).device
    with tqdm(total=max_tokens, desc="C0 key statistics", unit="tok", disable=None, leave=False) as bar:
        for i in range(0, len(passages), chunk):
            enc = tokenizer(passages[i : i + chunk], return_tensors="pt", padding=True, truncation=True,
                            max_length=128).to(device)
            mask = enc.attention_mask.bool()  # (B, L)
            take = min(int(mask.sum()), max_tokens - count)  # exactly max_tokens, in reading order
            for name, x in module_inputs(model, modules, enc.input_ids, enc.attention_mask, mask).items():
                x = x[:take].double()  # (tokens, in): sums over 10⁵ tokens keep their digits in fp64
                sums[name] = x.T @ x if name not in sums else sums[name] + x.T @ x
            count += take
            bar.update(take)
            if count >= max_tokens:
                break
    return {n: s.float() for n, s in sums.items()}, count


_MOMENTS: dict[tuple[str, str, str], torch.Tensor] = {}


def second_moment(lm, modules: dict[str, torch.nn.Module], source: str = "builtin",
                  max_tokens: int = 100_000) -> dict[str, torch.Tensor]:
    """C₀ = E[x xᵀ] per module (in, in) over a text source (`source_passages`), without any ridge.

    Computed once per base model, module, source and token cap (the blocks above the edited
    one are skipped; a progress bar shows the pass) and kept in memory and in the model cache
    folder under all four, so later edits and processes read it."""
    from safetensors.torch import load_file, save_file

    from editing.model import default_cache_dir

    key = f"{source_tag(source)}-{max_tokens}"
    path = default_cache_dir() / f"moments-{lm.fingerprint[:16]}-{key}.safetensors"
    if not all((lm.fingerprint, key, n) in _MOMENTS for n in modules) and path.exists():
        for n, c in load_file(path).items():
            _MOMENTS[(lm.fingerprint, key, n)] = c.to(lm.device)
    todo = {n: m for n, m in modules.items() if (lm.fingerprint, key, n) not in _MOMENTS}
    if todo:  # only now is the text read
        sums, count = _input_sums(lm.model, lm.tokenizer, todo, source_passages(source), max_tokens)
        for n, s in sums.items():
            _MOMENTS[(lm.fingerprint, key, n)] = s / count  # (in, in)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            mine = {n: c.cpu().contiguous() for (fp, k, n), c in _MOMENTS.items() if fp == lm.fingerprint and k == key}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(mine, str(tmp))
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except OSError:
            pass  # a read-only cache: recomputed per process
    return {n: _MOMENTS[(lm.fingerprint, key, n)] for n in modules}


def with_ridge(moment: torch.Tensor, ridge: float) -> torch.Tensor:
    """C + ridge · mean(diag C) · I: invertible even where the text left directions unseen."""
    return moment + ridge * moment.diagonal().mean() * torch.eye(len(moment), device=moment.device)


def whiten(keys: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """k̃ = C⁻¹k · |k| / (kᵀC⁻¹k) per row of `keys` (K, in): the key itself still sees |k|."""
    solved = torch.linalg.solve(moment, keys.T).T  # (K, in) = C⁻¹k
    gain = (solved * keys).sum(-1, keepdim=True)  # (K, 1) = kᵀC⁻¹k
    return solved * keys.norm(dim=-1, keepdim=True) / gain


def fact_keys(lm, modules: dict[str, torch.nn.Module], batch, positions: str, whitened: bool = True
              ) -> dict[str, torch.Tensor]:
    """ft-k's K̃ per module (K, in): the inputs at the positions the edit trains (`positions`),
    whitened, or unit length when `whitened` is off (both give a key the response |k|)."""
    mask = batch.subject_mask if positions != "all" else batch.attention_mask.bool()
    keys = module_inputs(lm.model, modules, batch.input_ids, batch.attention_mask, mask)
    if not whitened:
        return {n: torch.nn.functional.normalize(k, dim=-1) for n, k in keys.items()}
    moments = second_moment(lm, modules)
    return {n: whiten(k, with_ridge(moments[n], 0.05)) for n, k in keys.items()}
