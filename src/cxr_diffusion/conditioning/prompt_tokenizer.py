"""A CLIP-format BPE tokenizer learned from the prompt corpus, the same on every run.

The demo CLIP needs a vocabulary for its prompts. Hugging Face ``tokenizers``' ``BpeTrainer`` would
learn one, but not reproducibly: it numbers word-final symbols in hash-map order and breaks ties
between equally frequent pairs by those numbers, so two runs on the same prompts gave five different
vocabularies in five processes (huggingface/tokenizers#1794), and with them a different demo CLIP
and different results downstream. The corpus is a few hundred short prompts, so plain Python BPE is
instant; ties go to the lexicographically smallest pair.

The output is what ``CLIPTokenizer`` reads: CLIP's pre-tokenization (lowercased words, digits and
punctuation runs), GPT-2 byte-to-symbol mapping, ``</w>`` on each word's last symbol, a vocabulary
and a ranked merge list.
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter

import regex

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
_CLIP_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
VOCAB_FLOOR = 2 + 256 + 256  # the special tokens, the byte symbols and their word-final forms

Word = tuple[str, ...]


@functools.cache
def byte_symbols() -> tuple[str, ...]:
    """GPT-2/CLIP's printable stand-in for each byte value: printable Latin-1 bytes stand for
    themselves, the other 68 bytes take the code points from 256 upwards, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    symbols, shifted = [], 256
    for value in range(256):
        if value in printable:
            symbols.append(chr(value))
        else:
            symbols.append(chr(shifted))
            shifted += 1
    return tuple(symbols)


def split_words(text: str) -> list[Word]:
    """``text`` as CLIP pre-tokenizes it, each word a tuple of byte symbols with ``</w>`` on the last."""
    symbols = byte_symbols()
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    words = []
    for piece in _CLIP_SPLIT.findall(text):
        if piece in (BOS, EOS):
            continue
        encoded = [symbols[b] for b in piece.encode("utf-8")]
        words.append((*encoded[:-1], encoded[-1] + END_OF_WORD))
    return words


def _merge(word: Word, pair: tuple[str, str]) -> Word:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def learn_merges(word_counts: Counter[Word], max_merges: int) -> list[tuple[str, str]]:
    """Ranked BPE merges: each step joins the most frequent adjacent pair (ties: smallest pair)."""
    words, merges = dict(word_counts), []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {_merge(word, best): count for word, count in words.items()}
    return merges


def train_prompt_tokenizer(prompts: list[str], vocab_size: int, max_length: int):
    """A ``CLIPTokenizer`` of at most ``max(vocab_size, VOCAB_FLOOR)`` tokens learned from ``prompts``.
    As in CLIP's vocabulary: the special tokens, the 256 byte symbols and their 256 word-final forms (so
    any text encodes without unknown tokens, whatever it ends a word with), then the merges."""
    from transformers import CLIPTokenizer

    word_counts = Counter(word for prompt in prompts for word in split_words(prompt))
    symbols = byte_symbols()
    base = [BOS, EOS, *symbols, *(symbol + END_OF_WORD for symbol in symbols)]
    merges = learn_merges(word_counts, max(vocab_size, VOCAB_FLOOR) - len(base))
    # Two merges can spell the same token ("ab"+"c", "a"+"bc"): it gets one id.
    vocab = {token: i for i, token in enumerate(dict.fromkeys(base + [a + b for a, b in merges]))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
