"""OpenAI CLIP's byte-level BPE, standard library only: where its data lies, its vocabulary, and a tokenizer for
counting tokens in the app process (the prompt boxes' token counter) without transformers or torch.

The data is one file, `bpe_simple_vocab_16e6.txt.gz`, shipped inside the open-clip-torch package: a header line,
then BPE merges. The vocabulary is the 256 byte-level characters, the same with the end-of-word marker `</w>`, one
token per merge (the first 48894 merges), then `<|startoftext|>` and `<|endoftext|>`: 49408 tokens
(`backend.engine.tokenizer` builds the sampling-side tokenizer from the same data).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

def bpe_data_path() -> Path:
    """Where open-clip-torch keeps the BPE merges, found without importing open_clip (which pulls in torch models)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The open-clip-torch package is not installed; it provides the CLIP tokenizer's BPE data.")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{BPE_FILE_NAME} was not found in the open_clip package ({list(spec.submodule_search_locations)}).")


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's map from bytes to printable unicode characters (byte-level BPE alphabet), in vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_merges(bpe_path: Path | None = None) -> list[tuple[str, str]]:
    """The BPE merges CLIP uses (the file's first 48894 after its header line)."""
    lines = gzip.open(bpe_path or bpe_data_path()).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]


def build_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges exactly as OpenAI's `SimpleTokenizer` computes them."""
    merges = read_merges(bpe_path)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens.extend("".join(m) for m in merges)
    tokens.extend([BOS, EOS])
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"unexpected CLIP vocabulary size {len(tokens)} (expected {VOCAB_SIZE})")
    return {tok: i for i, tok in enumerate(tokens)}, merges



class ClipBPE:
    """CLIP's tokenizer as OpenAI's SimpleTokenizer splits text: lower-cased, words and punctuation, BPE merges."""

    def __init__(self, bpe_path: Path | None = None):
        import regex

        self.ranks = {pair: i for i, pair in enumerate(read_merges(bpe_path))}
        self.byte_encoder = bytes_to_unicode()
        self.pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                     r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
        self.bpe = functools.lru_cache(maxsize=20000)(self._bpe)

    def _bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    @staticmethod
    def clean(text: str) -> str:
        try:
            import ftfy
            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text))
        return " ".join(text.split()).lower()

    def tokens(self, text: str) -> list[str]:
        out: list[str] = []
        for piece in self.pattern.findall(self.clean(text)):
            encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            out.extend(self.bpe(encoded))
        return out


@functools.lru_cache(maxsize=1)
def clip_bpe() -> ClipBPE:
    """The one shared counter tokenizer (read-only once built)."""
    return ClipBPE()
