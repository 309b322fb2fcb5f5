"""Text conditioning with AUTOMATIC1111's prompt semantics.

A prompt is parsed into (text, weight) pieces, tokenized into 75-token chunks
(with BREAK and A1111's comma backtracking), each chunk encoded as
[BOS] 75 tokens [EOS] by every text encoder of the model, the weights applied to
the hidden states as the setting `emphasis` says (A1111's modes, `EMPHASIS_MODES`;
"Original": multiplied, then the mean restored), and the chunks concatenated.
SDXL concatenates both encoders' hidden states and adds the pooled
embedding of the second encoder. Prompt editing/alternation schedules are encoded
once per distinct text and looked up per sampling step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backend.core import prompt_parser
from backend.core.errors import JobInterrupted
from backend.core.limits import check_chunk_count
from backend.core.options import EMPHASIS_MODES

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
ID_START = 49406
ID_END = 49407


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    # Textual-inversion embeddings in this chunk: (offset among its 75 tokens, backend.embeddings.Embedding).
    fixes: list[tuple[int, object]] = field(default_factory=list)


@dataclass
class Conditioning:
    """One prompt's encoding: cross-attention states [T, D] and, for SDXL, the pooled vector [P]."""

    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None


def tokenize_prompt(tokenizer, prompt: str, pad_id: int, embeddings=None,
                    parse_weights: bool = True) -> tuple[list[PromptChunk], int]:
    """Split `prompt` into 77-token chunks with per-token weights; returns the chunks and the token count.

    With `embeddings` (`backend.embeddings.JobEmbeddings`), an embedding's name becomes as many
    placeholder tokens as it has vectors (kept within one chunk), recorded in the chunk's `fixes`.
    `parse_weights=False` (emphasis "None"): the whole prompt is text of weight 1, brackets and BREAK included.
    """
    parsed = prompt_parser.parse_prompt_attention(prompt) if parse_weights else [(prompt, 1.0)]
    texts = [text for text, _ in parsed]
    tokenized = tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
    comma_token = tokenizer.get_vocab().get(",</w>")

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal token_count, last_comma, chunk
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        # [BOS] tokens [EOS] then padding, 77 in all: EOS ends the text, the pad id fills the rest.
        body = [ID_START] + chunk.tokens + [ID_END]
        chunk.tokens = body + [pad_id] * (CHUNK_LENGTH + 2 - len(body))
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * (CHUNK_LENGTH + 1 - len(chunk.multipliers))
        last_comma = -1
        chunks.append(chunk)
        chunk = PromptChunk()

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk.tokens)
            elif (len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                split = last_comma + 1
                moved_tokens, moved_mults = chunk.tokens[split:], chunk.multipliers[split:]
                moved_fixes = [(offset - split, emb) for offset, emb in chunk.fixes if offset >= split]
                chunk.tokens, chunk.multipliers = chunk.tokens[:split], chunk.multipliers[:split]
                chunk.fixes = [(offset, emb) for offset, emb in chunk.fixes if offset < split]
                next_chunk()
                chunk.tokens, chunk.multipliers, chunk.fixes = moved_tokens, moved_mults, moved_fixes
            if len(chunk.tokens) == CHUNK_LENGTH:
                next_chunk()
            found = embeddings.find_at(tokens, position) if embeddings else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            embedding, name_length = found
            count = min(int(embedding.count), CHUNK_LENGTH)
            if len(chunk.tokens) + count > CHUNK_LENGTH:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * count
            chunk.multipliers += [weight] * count
            position += name_length
    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


def count_tokens(tokenizer, prompt: str) -> int:
    """Token count as shown beside the prompt box (A1111's 'N/75' counter)."""
    _, count = tokenize_prompt(tokenizer, prompt, ID_END)
    return count


class TextConditioner:
    """Encodes prompts for one loaded model (`backend.engine.model_loader.SDModel`)."""

    def __init__(self, model, device: torch.device, clip_skip: int = 1, embeddings=None, max_chunks: int | None = None,
                 should_stop=None, emphasis: str = "Original"):
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"unknown emphasis mode {emphasis!r}; one of {EMPHASIS_MODES}")
        self.emphasis = emphasis  # setting `emphasis`: how prompt weights act on the hidden states
        self.model = model
        self.device = device
        self.clip_skip = max(1, int(clip_skip))
        self.embeddings = embeddings  # backend.embeddings.JobEmbeddings, or None
        self.max_chunks = max_chunks  # setting prompt_max_chunks: longer prompts are refused before encoding
        self.should_stop = should_stop  # () -> bool (Interrupt): checked between chunks; raises JobInterrupted
        self._cache: dict[tuple[str, bool], Conditioning] = {}

    # -- encoders ---------------------------------------------------------------------------
    def _pad_id(self, index: int) -> int:
        # OpenAI CLIP-L pads with EOS; OpenCLIP encoders (SD2, SDXL's second) pad with 0 ("!").
        if self.model.family in ("sd2", "sdxl_refiner") or index == 1:
            return 0
        return ID_END

    def _hidden(self, encoder, tokens: torch.Tensor, index: int, fixes=()) -> tuple[torch.Tensor, torch.Tensor | None]:
        family = self.model.family
        if fixes:
            out = run_with_embeddings(encoder, tokens, fixes, lambda emb: self.embeddings.vectors(emb, index))
        else:
            out = encoder(input_ids=tokens, output_hidden_states=True)
        hidden_states = out.hidden_states
        pooled = getattr(out, "text_embeds", None)
        if family == "sd1":
            z = out.last_hidden_state if self.clip_skip == 1 else _final_norm(encoder)(hidden_states[-self.clip_skip])
        elif family == "sd2":
            z = _final_norm(encoder)(hidden_states[-(self.clip_skip + 1)])
        else:  # sdxl (and its refiner): penultimate layer of each encoder, no final norm
            z = hidden_states[-(self.clip_skip + 1)]
        return z, pooled

    def _encode_chunks(self, per_encoder_chunks: list[list[PromptChunk]], zero: bool) -> Conditioning:
        n_chunks = len(per_encoder_chunks[0])
        zs = []
        pooled_first = None
        for c in range(n_chunks):
            if self.should_stop is not None and self.should_stop():
                raise JobInterrupted()
            parts = []
            for index, encoder in enumerate(self.model.text_encoders):
                chunk = per_encoder_chunks[index][c]
                tokens = torch.tensor([chunk.tokens], device=self.device)
                z, pooled = self._hidden(encoder, tokens, index, chunk.fixes)
                parts.append(self._emphasize(z, chunk.multipliers))
                if c == 0 and pooled is not None:
                    pooled_first = pooled
            zs.append(torch.cat(parts, dim=-1))
        crossattn = torch.cat(zs, dim=1)[0]
        pooled = pooled_first[0] if pooled_first is not None else None
        if zero:
            crossattn = torch.zeros_like(crossattn)
            pooled = torch.zeros_like(pooled) if pooled is not None else None
        return Conditioning(crossattn=crossattn, pooled=pooled)

    def _emphasize(self, z: torch.Tensor, multipliers: list[float]) -> torch.Tensor:
        """The chunk's token weights applied to its hidden states [1, 77, D], as the emphasis mode says."""
        if self.emphasis in ("None", "Ignore"):
            return z
        mult = torch.tensor(multipliers, device=z.device, dtype=z.dtype).reshape(1, -1, 1)
        if self.emphasis == "No norm":
            return z * mult
        original_mean = z.mean()
        z = z * mult
        return z * (original_mean / z.mean())

    @torch.no_grad()
    def encode(self, prompt: str, is_negative: bool = False) -> Conditioning:
        prompt = prompt_parser.extract_extra_network_tags(prompt)[0]  # <lora:...> tags are no text
        key = (prompt, is_negative)
        if key in self._cache:
            return self._cache[key]
        if self.should_stop is not None and self.should_stop():
            raise JobInterrupted()
        per_encoder = []
        for index, tokenizer in enumerate(self.model.tokenizers):
            chunks, tokens = tokenize_prompt(tokenizer, prompt, self._pad_id(index), self.embeddings,
                                             parse_weights=self.emphasis != "None")
            if self.max_chunks is not None:
                check_chunk_count(len(chunks), tokens, "Negative prompt" if is_negative else "Prompt", self.max_chunks)
            per_encoder.append(chunks)
        n = max(len(c) for c in per_encoder)
        for index, chunks in enumerate(per_encoder):  # encoders may disagree only in padding; keep counts equal
            while len(chunks) < n:
                chunks.extend(tokenize_prompt(self.model.tokenizers[index], "", self._pad_id(index))[0])
        # A1111: SDXL with an empty negative prompt uses zero embeddings.
        zero = self.model.family in ("sdxl", "sdxl_refiner") and is_negative and prompt == ""
        cond = self._encode_chunks(per_encoder, zero)
        self._cache[key] = cond
        return cond

    def empty_chunk(self) -> torch.Tensor:
        """One 77-token chunk of the empty prompt, used to pad cond and uncond to the same length."""
        return self.encode("").crossattn[:77]

    def schedules(self, prompts: list[str], steps: int, is_negative: bool, hires_steps: int | None = None) -> "ScheduledConds":
        # The texts' lengths were checked at the edge (backend.core.limits); any brackets are accepted, as A1111.
        prompts = [prompt_parser.extract_extra_network_tags(p)[0] for p in prompts]  # tags stay in the infotext only
        plans = prompt_parser.get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps)
        encoded = [[(end, self.encode(text, is_negative)) for end, text in plan] for plan in plans]
        return ScheduledConds(encoded)


def run_with_embeddings(encoder, tokens: torch.Tensor, fixes, vectors):
    """Run a CLIP text encoder on one chunk's `tokens` with the placeholder tokens' embeddings replaced by the
    textual-inversion vectors (`fixes`: (offset in the chunk, embedding); `vectors(embedding)` -> its [n, D])."""
    def put_vectors(_module, _inputs, output):
        output = output.clone()
        for offset, embedding in fixes:
            vec = vectors(embedding).to(output.device, output.dtype)
            n = min(output.shape[1] - offset - 1, vec.shape[0])
            output[0, offset + 1:offset + 1 + n] = vec[:n]
        return output

    handle = _token_embedding(encoder).register_forward_hook(put_vectors)
    try:
        return encoder(input_ids=tokens, output_hidden_states=True)
    finally:
        handle.remove()


def _token_embedding(encoder):
    return getattr(encoder, "text_model", encoder).embeddings.token_embedding


def _final_norm(encoder):
    text_model = getattr(encoder, "text_model", encoder)
    return text_model.final_layer_norm


class ScheduledConds:
    """Per-image lists of (end_at_step, Conditioning); `at(step)` picks A1111's entry for a 0-based step."""

    def __init__(self, per_image: list[list[tuple[int, Conditioning]]]):
        self.per_image = per_image

    def at(self, step: int) -> list[Conditioning]:
        out = []
        for plan in self.per_image:
            chosen = plan[-1][1]
            for end_at, cond in plan:
                if step <= end_at:
                    chosen = cond
                    break
            out.append(chosen)
        return out

    def max_tokens(self) -> int:
        return max(cond.crossattn.shape[0] for plan in self.per_image for _, cond in plan)


def stack_padded(conds: list[Conditioning], length: int, empty_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack conditionings into a batch, padding each to `length` tokens with empty-prompt chunks."""
    rows = []
    for cond in conds:
        z = cond.crossattn
        while z.shape[0] < length:
            z = torch.cat([z, empty_chunk.to(z.dtype)], dim=0)
        rows.append(z)
    pooled = None
    if conds and conds[0].pooled is not None:
        pooled = torch.stack([c.pooled for c in conds])
    return torch.stack(rows), pooled
