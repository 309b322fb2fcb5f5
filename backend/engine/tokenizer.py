"""The CLIP tokenizer, built offline from the BPE data that ships inside `open-clip-torch`.

OpenAI's CLIP tokenizer (and so Stable Diffusion's) is defined by one file,
`bpe_simple_vocab_16e6.txt.gz`: a header line, then BPE merges. Its vocabulary is
the 256 byte-level characters, the same with the end-of-word marker `</w>`, one
token per merge (the first 48894 merges), then `<|startoftext|>` and
`<|endoftext|>`: 49408 tokens. We write that vocabulary as `vocab.json` and
`merges.txt` once into a cache folder and build a `transformers.CLIPTokenizer`
from them, so no hub download is ever needed. Its ids equal OpenAI's.

Two kinds exist: "clip_l" (OpenAI CLIP ViT-L/14, SD1 and SDXL's first encoder,
padding with `<|endoftext|>`) and "clip_g" (OpenCLIP, SDXL's second encoder and SD2,
padding with "!", id 0).
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

# the BPE data and vocabulary (torch-free: the app's token counter reads them too)
from backend.core.clip_bpe import (BOS, BPE_FILE_NAME, EOS, VOCAB_SIZE, bpe_data_path,  # noqa: F401
                                   build_vocab_and_merges, bytes_to_unicode)

DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / "cache" / "clip_tokenizer"  # <repo>/cache
MAX_LENGTH = 77
KINDS = ("clip_l", "clip_g")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_tokenizer_files(cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt into `cache_dir` if they are not there yet; returns their paths."""
    cache_dir = Path(cache_dir)
    vocab_file, merges_file = cache_dir / "vocab.json", cache_dir / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return vocab_file, merges_file
    cache_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    _atomic_write(vocab_file, json.dumps(vocab, ensure_ascii=False))
    _atomic_write(merges_file, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def _read_files(vocab_file: Path, merges_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    if len(vocab) != VOCAB_SIZE or len(merges) != VOCAB_SIZE - 512 - 2:
        raise ValueError("incomplete tokenizer files")
    return vocab, merges


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(kind: str, cache_dir: str):
    from transformers import CLIPTokenizer

    vocab_file, merges_file = ensure_tokenizer_files(Path(cache_dir))
    try:
        vocab, merges = _read_files(vocab_file, merges_file)
    except (ValueError, OSError):  # a damaged cache: rebuild it
        vocab_file.unlink(missing_ok=True)
        merges_file.unlink(missing_ok=True)
        vocab_file, merges_file = ensure_tokenizer_files(Path(cache_dir))
        vocab, merges = _read_files(vocab_file, merges_file)
    pad = "!" if kind == "clip_g" else EOS
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=pad,
                         model_max_length=MAX_LENGTH)


def clip_tokenizer(kind: str = "clip_l", cache_dir: Path = DEFAULT_CACHE_DIR):
    """A `transformers.CLIPTokenizer` with OpenAI's ids; "clip_g" pads with "!" (id 0) as SDXL's second tokenizer.

    Built once per (kind, cache folder) and shared: treat it as read-only.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    return _cached_tokenizer(kind, str(Path(cache_dir).resolve()))
