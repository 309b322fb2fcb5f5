"""The prompt boxes' token counter (AUTOMATIC1111's "12/75"): how many CLIP tokens a prompt takes, counted as the
conditioning encodes it, and the length of the chunks of 75 it fills.

As A1111's `get_prompt_lengths`: extra-network tags (`<lora:...>`) take no tokens, emphasis brackets and weights
take none, BREAK fills the chunk it ends, and a prompt that changes during sampling (`[from:to:when]`,
`[a|b]`) counts as its longest version. Standard library only (the app process counts; no model is needed).
"""
from __future__ import annotations

from backend.core.clip_bpe import clip_bpe
from backend.core.prompt_parser import extract_extra_network_tags, get_learned_conditioning_prompt_schedules, \
    parse_prompt_attention

CHUNK = 75


def _count(text: str) -> int:
    tokenizer = clip_bpe()
    count = 0
    for piece, weight in parse_prompt_attention(text):
        if piece == "BREAK" and weight == -1:  # BREAK: the chunk it ends is filled
            count = -(-count // CHUNK) * CHUNK if count else count
            continue
        count += len(tokenizer.tokens(piece))
    return count


def prompt_tokens(prompt: str, steps: int = 20) -> tuple[int, int]:
    """(tokens, chunk length it fills: 75, 150, ...) for a prompt."""
    text, _networks = extract_extra_network_tags(prompt or "")
    try:
        schedules = get_learned_conditioning_prompt_schedules([text], max(1, int(steps)))[0]
        versions = [version for _step, version in schedules]
    except Exception:  # a prompt still being typed may not parse yet: count it as it stands
        versions = [text]
    count = max(_count(version) for version in versions)
    return count, max(CHUNK, -(-count // CHUNK) * CHUNK)


def counter_text(prompt: str, steps: int = 20) -> str:
    count, target = prompt_tokens(prompt, steps)
    return f"{count}/{target}"
