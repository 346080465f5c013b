"""A handmade CLIP BPE tokenizer, built offline from a word list.

Every printable ASCII character is a token (so any prompt encodes), and each listed word gets
its own whole-word token through a chain of merges. Files are written in CLIP's format and loaded
with ``CLIPTokenizer.from_pretrained(folder)``: under transformers 5, passing ``vocab_file=`` /
``merges_file=`` to the constructor silently builds an empty tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words of the tiny world and of typical captions; anything else falls back to characters.
DEFAULT_WORDS = """
a an the of and with on in at to is are there photo picture image drawing sign that says
text written reads word letters left right above below top bottom next near middle center
one two three four five six seven eight nine zero no
red orange yellow green blue purple pink brown black white gray grey
circle circles square squares triangle triangles star stars cross crosses diamond diamonds
heart hearts ring rings hexagon hexagons object objects shape shapes
small large big tiny huge bright dark light plain textured striped dotted background scene
""".split()


def _chars() -> list[str]:
    return [chr(c) for c in range(33, 127)]


def _train_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Learn BPE merges on ``words`` until every word is one token; deterministic.

    Hand-written merge chains interfere (the merge for "to" would split "photo" into "pho to"),
    and the ``tokenizers`` trainer breaks ties in hash order, so this is plain BPE training:
    repeatedly merge the most frequent adjacent pair, ties broken alphabetically. Replaying the
    merges by rank, as CLIP's tokenizer does, then turns each listed word into its own token.
    """
    segmented = [list(word[:-1]) + [word[-1] + "</w>"] for word in words if len(word) > 1]
    vocab = {char: i for i, char in enumerate(_chars())}
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        vocab.setdefault(merged, len(vocab))
        for k, symbols in enumerate(segmented):
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            segmented[k] = out
    return vocab, merges


def write_tokenizer(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and configs for a CLIP tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = [w for w in dict.fromkeys(w.lower() for w in words) if all(33 <= ord(c) < 127 for c in w)]
    vocab, merges = _train_bpe(words)

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for char in _chars():  # a one-character word is the single symbol "c</w>"
        add(char)
        add(char + "</w>")
    add(BOS)
    add(EOS)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + merges
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "do_lower_case": True,
            }
        )
    )
    return folder


# CLIP's pre-tokenizer pattern, except that capital letters stand alone instead of joining the
# letters around them (with no lower-casing, see below).
_CHAR_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{Ll}]+|[\p{Lu}]|[\p{N}]|[^\s\p{L}\p{N}]+"


def build_tokenizer(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16, char_tokens: bool = False):
    """Write the tokenizer files into ``folder`` and load them as a ``CLIPTokenizer``.

    ``char_tokens=True`` returns the same BPE vocabulary as a plain fast tokenizer that keeps case
    and makes every capital letter and digit one token. The tiny world's quoted texts are capitals
    and digits: CLIP's lower-casing would merge them with caption words ("ON" -> the token "on")
    and split unseen strings by merges learned on English, so the same character would reach the
    text encoder as different tokens in different strings. ``CLIPTokenizer`` cannot do this (its
    constructor always re-installs lower-casing), hence the generic fast class.
    """
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    clip = CLIPTokenizer.from_pretrained(str(write_tokenizer(folder, words, max_length)))
    if not char_tokens:
        return clip
    from tokenizers import Regex, normalizers, pre_tokenizers

    backend = clip.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CHAR_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=clip.bos_token, eos_token=clip.eos_token, unk_token=clip.unk_token,
        pad_token=clip.pad_token, model_max_length=max_length,
    )


def portable_tokenizer_class(folder: str | Path) -> None:
    """After ``save_pretrained`` of a pipeline: transformers 5 names a plain fast tokenizer
    (``char_tokens``) "TokenizersBackend", which transformers 4 lacks; "PreTrainedTokenizerFast"
    loads the same tokenizer.json under both."""
    folder = Path(folder)
    for path in [folder / "model_index.json", *folder.glob("tokenizer*/tokenizer_config.json")]:
        text = path.read_text()
        if '"TokenizersBackend"' in text:
            path.write_text(text.replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
