"""Limits that keep one request from holding the backend hostage (settings in the "Limits" section).

- `prompt_max_chunks`: a prompt (and negative / hires. fix prompt) may encode to at most this many 75-token
  chunks. The app process refuses a text that is obviously too long by its length in characters, before any
  parsing (`check_prompt_text`); the backend counts the tokens exactly before encoding (`check_chunk_count`).
- `max_images_per_job`: batch_size x n_iter.

Refusals are 4xx UserErrors that name the limit and the setting. Torch-free: both processes use it.
"""
from __future__ import annotations

from backend.core.errors import UserError

CHUNK_TOKENS = 75
# No CLIP token is longer than this many characters, and the emphasis syntax around one, like "((word:1.25))",
# adds a handful more: a prompt longer than max_chunks * 75 * CHARS_PER_TOKEN_BOUND characters cannot fit.
CHARS_PER_TOKEN_BOUND = 32
LIMIT_SETTINGS = ("prompt_max_chunks", "max_images_per_job")

PROMPT_FIELDS = (("prompt", "Prompt"), ("negative_prompt", "Negative prompt"), ("hr_prompt", "Hires prompt"),
                 ("hr_negative_prompt", "Hires negative prompt"))


def prompt_char_bound(max_chunks: int) -> int:
    return max(1, int(max_chunks)) * CHUNK_TOKENS * CHARS_PER_TOKEN_BOUND


def check_prompt_text(text: str, what: str, max_chunks: int) -> None:
    """Refuse a text whose length alone shows it encodes to more than `max_chunks` chunks (cheap, no parsing)."""
    bound = prompt_char_bound(max_chunks)
    if len(text) > bound:
        raise UserError(f"{what} is {len(text)} characters long, far more than the limit of {max_chunks} chunks of "
                        f"{CHUNK_TOKENS} tokens ({max_chunks * CHUNK_TOKENS} tokens, at most {bound} characters) allows. "
                        f"Shorten it, or raise the limit in Settings > Limits (prompt_max_chunks).", status=413)


def check_chunk_count(chunks: int, tokens: int, what: str, max_chunks: int) -> None:
    """Refuse a prompt that tokenizes to more than `max_chunks` chunks (the exact check, before encoding)."""
    if chunks > max_chunks:
        raise UserError(f"{what} has {tokens} tokens in {chunks} chunks of {CHUNK_TOKENS}; the limit is {max_chunks} "
                        f"chunks ({max_chunks * CHUNK_TOKENS} tokens). Shorten it, or raise the limit in "
                        f"Settings > Limits (prompt_max_chunks).", status=413)


def check_request(req, options) -> None:
    """The app process's early checks of a generation request against the server's limits (`options`: its
    settings, never the request's override_settings)."""
    max_chunks = int(options["prompt_max_chunks"])
    for field, what in PROMPT_FIELDS:
        text = getattr(req, field, None)
        if isinstance(text, str):
            check_prompt_text(text, what, max_chunks)
    max_images = int(options["max_images_per_job"])
    images = int(req.batch_size) * int(req.n_iter)
    if images > max_images:
        raise UserError(f"batch_size x n_iter is {req.batch_size} x {req.n_iter} = {images} images; the limit is "
                        f"{max_images} images per job. Ask for fewer, or raise the limit in Settings > Limits "
                        f"(max_images_per_job).", status=400)
