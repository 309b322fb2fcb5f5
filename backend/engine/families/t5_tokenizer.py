"""The T5 v1.1 tokenizer that FLUX.1 and Stable Diffusion 3 use for their T5-XXL text encoder.

Its one data file is Google's SentencePiece model `spiece.model` (32000 unigram pieces) of google/t5-v1_1-xxl,
the same file FLUX.1 (`tokenizer_2/`) and SD3 (`tokenizer_3/`) ship. It is kept in
`models/text_encoder/t5-tokenizer/spiece.model` (beside the text encoder files it serves) and downloaded there on
first use with a progress bar; offline before that, a `UserError` names the file, the folder and the URL so it can
be put there by hand. Afterwards the network is never touched.

The file is a protobuf message (`sentencepiece_model.proto`). transformers 5 converts it only through the protobuf
package, so the few fields a unigram tokenizer needs are read here from the wire format directly: the pieces with
their scores and types, the unknown-piece id and the normalizer's precompiled character map (NFKC as SentencePiece
applies it). From them transformers' `T5Tokenizer` (its Rust "tokenizers" backend) is built, exactly as its own
converter builds it: the `<extra_id_N>` sentinels after the 32000 pieces (32100 ids; the encoder's 32128 embedding
rows cover them), `</s>` (id 1) ends a sequence, `<pad>` (id 0) pads it.
"""
from __future__ import annotations

import functools
import logging
import struct
from pathlib import Path
from typing import Callable

from backend.core.errors import UserError

log = logging.getLogger(__name__)

T5_TOKENIZER_URL = "https://huggingface.co/google/t5-v1_1-xxl/resolve/main/spiece.model"
T5_TOKENIZER_FILE = "spiece.model"
T5_TOKENIZER_FOLDER = Path("text_encoder") / "t5-tokenizer"  # under models/
T5_EXTRA_IDS = 100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's SentencePiece ids: <pad>, </s>, <unk>


def t5_tokenizer_path(models_dir: Path) -> Path:
    return Path(models_dir) / T5_TOKENIZER_FOLDER / T5_TOKENIZER_FILE


def t5_tokenizer(models_dir: Path, *, allow_download: bool = True,
                 progress: Callable[[int, int], None] | None = None):
    """The T5 v1.1 tokenizer from `models_dir`/text_encoder/t5-tokenizer/ (downloaded there on first use).

    Built once per process and file version. `allow_download=False` (or no connection) and no file: a `UserError`
    (503) saying which file to put where, and where to get it.
    """
    path = t5_tokenizer_path(models_dir)
    if not path.is_file():
        _download(path, allow_download, progress)
    st = path.stat()
    return _load(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _download(path: Path, allow_download: bool, progress) -> None:
    hint = (f"FLUX.1 and Stable Diffusion 3 need the T5 tokenizer file {T5_TOKENIZER_FILE} in {path.parent}. "
            f"Download it from {T5_TOKENIZER_URL} and put it there")
    if not allow_download:
        raise UserError(hint + " (downloads are off).", status=503)
    from backend.downloads import download_file, network_available
    if not network_available(T5_TOKENIZER_URL):
        raise UserError(hint + " (no internet connection was found to download it now).", status=503)
    log.info("downloading the T5 tokenizer into %s", path.parent)
    try:
        download_file(T5_TOKENIZER_URL, path, progress)
    except UserError as exc:
        raise UserError(f"{hint}. The automatic download failed: {exc.message}", status=503) from exc


@functools.lru_cache(maxsize=2)
def _load(path: str, _size: int, _mtime_ns: int):
    from transformers import T5Tokenizer

    model = read_sentencepiece_model(Path(path))
    pieces = model["pieces"]
    if model["model_type"] != 1:
        raise UserError(f"{path} is not a unigram SentencePiece model, so not T5's tokenizer; "
                        f"replace it with {T5_TOKENIZER_URL}.")
    if (len(pieces) <= UNK_ID or model["unk_id"] != UNK_ID
            or [p[0] for p in pieces[:3]] != ["<pad>", "</s>", "<unk>"]):
        first = [p[0] for p in pieces[:3]]
        raise UserError(f"{path} is a SentencePiece model, but not T5's (its first pieces are {first}, T5 has "
                        f"<pad>, </s>, <unk>); replace it with {T5_TOKENIZER_URL}.")
    vocab = [(piece, score) for piece, score, _type in pieces]
    tokenizer = T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=model["precompiled_charsmap"],
                            extra_ids=T5_EXTRA_IDS)
    log.info("T5 tokenizer: %d pieces from %s", len(tokenizer), path)
    return tokenizer


# -- SentencePiece model file (protobuf wire format) ----------------------------------------------------------
# ModelProto: 1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec.
# SentencePiece: 1 piece (string), 2 score (float), 3 type (enum, NORMAL=1 default).
# TrainerSpec: 3 model_type (enum, UNIGRAM=1 default), 40 unk_id (int32, default 0).
# NormalizerSpec: 2 precompiled_charsmap (bytes).
def read_sentencepiece_model(path: Path) -> dict:
    """The pieces [(piece, score, type)], model type, unk id and precompiled charsmap of a `.model` file."""
    data = Path(path).read_bytes()
    try:
        out = {"pieces": [], "model_type": 1, "unk_id": 0, "precompiled_charsmap": None}
        for field, value in _fields(data):
            if field == 1:
                piece, score, kind = "", 0.0, 1
                for f, v in _fields(value):
                    if f == 1:
                        piece = v.decode("utf-8")
                    elif f == 2:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3:
                        kind = v
                out["pieces"].append((piece, score, kind))
            elif field == 2:
                for f, v in _fields(value):
                    if f == 3:
                        out["model_type"] = v
                    elif f == 40:
                        out["unk_id"] = v
            elif field == 3:
                for f, v in _fields(value):
                    if f == 2:
                        out["precompiled_charsmap"] = bytes(v) or None
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise UserError(f"{path} is not a readable SentencePiece model ({exc}); replace it with "
                        f"{T5_TOKENIZER_URL}.") from exc
    if not out["pieces"]:
        raise UserError(f"{path} holds no SentencePiece pieces; replace it with {T5_TOKENIZER_URL}.")
    return out


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for length-delimited and fixed32."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield field, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")
