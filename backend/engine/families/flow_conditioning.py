"""Text conditioning for FLUX.1 and Stable Diffusion 3, with AUTOMATIC1111's prompt semantics.

The prompt syntax is the one of `backend.engine.conditioning`: emphasis `(a:1.2)` as the setting `emphasis` says
("Original": weights multiplied into the hidden states, then the chunk's mean restored; "No norm": multiplied;
"Ignore": parsed, not applied; "None": the brackets are text), `BREAK`, `<lora:...>` tags removed, prompt editing
and alternation through `ScheduledConds` (one encoding per distinct text, looked up per step).

FLUX.1 (as Forge and the reference pipeline):
- pooled [768] = CLIP-L's pooled output (final norm at the first EOS) of the prompt's first 77-token chunk;
- context [256k, 4096] = T5-XXL's last hidden state. Each BREAK-separated part of the prompt is one T5 pass (T5's
  relative positions see the whole part, as Forge encodes it), its tokens followed by `</s>` and padded with `<pad>`
  to a multiple of 256 tokens, the unit in which cond and uncond are padded to equal length.

Stable Diffusion 3 (as Stability AI's reference code):
- per 77-token chunk, CLIP-L's and CLIP-G's penultimate hidden states (no final norm) concatenated on channels
  (768 + 1280 = 2048) and zero-padded to the context width (4096);
- then, along the tokens, T5-XXL's last hidden state of the prompt (each BREAK part one pass, `</s>`, padded to a
  multiple of 77 tokens; without a T5 model, zeros as diffusers uses). CLIP chunks and T5 blocks are made equal in
  number (empty-prompt CLIP chunks, more T5 padding), so the context is [154k, 4096]: k CLIP chunks then k T5 blocks;
- pooled [2048] = CLIP-L's pooled output ++ CLIP-G's projected pooled output of the first chunk.

Padding cond and uncond to equal length (`empty_chunk`, for `backend.engine.conditioning.stack_padded`): a block of
the empty prompt's encoding, one unit long (FLUX: 256 T5 tokens of `</s><pad>...`; SD3: one empty CLIP chunk and
one 77-token T5 block). Neither transformer gives text tokens a position (FLUX's text ids are all zero in its
RoPE; SD3 has no positional embedding for the context), so where the block goes does not matter, only what it
holds: more of the padding states each model was trained with (the FLUX pipeline pads T5 to 512 tokens, SD3's to
77), not zeros, which neither model saw in a prompt.

Textual-inversion embeddings act on the CLIP encoders (encoder index 0 = CLIP-L, 1 = CLIP-G, as SDXL embeddings
are stored); T5 has none. Interrupt is checked between encoder passes.
"""
from __future__ import annotations

import torch

from backend.core import prompt_parser
from backend.core.errors import JobInterrupted, UserError
from backend.core.limits import check_chunk_count
from backend.core.options import EMPHASIS_MODES
from backend.engine.conditioning import (ID_END, Conditioning, PromptChunk, ScheduledConds, run_with_embeddings,
                                         tokenize_prompt)

CLIP_CHUNK = 77
T5_UNIT = {"flux": 256, "sd3": 77}  # tokens per T5 block: FLUX as Forge, SD3 as Stability AI's reference
T5_EOS, T5_PAD = 1, 0
CONTEXT_WIDTH = 4096  # T5-XXL's width, SD3's joint attention width
CLIP_ENCODERS = {"flux": ("clip_l",), "sd3": ("clip_l", "clip_g")}


class FlowConditioner:
    """Encodes prompts for a loaded FLUX.1 or SD3 model (`backend.engine.families.flow_model.FlowModel`).

    `encoder_devices` ({"t5xxl": cpu, ...}) names the device an encoder runs on where it is not `device` (the T5
    kept on the CPU); results are always float32 on `device`.
    """

    def __init__(self, model, device, embeddings=None, should_stop=None, emphasis: str = "Original", *,
                 max_chunks: int | None = None, encoder_devices: dict | None = None):
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"unknown emphasis mode {emphasis!r}; one of {EMPHASIS_MODES}")
        if model.family not in T5_UNIT:
            raise ValueError(f"FlowConditioner is for FLUX and SD3 models, not {model.family!r}")
        self.model = model
        self.family = model.family
        self.device = torch.device(device)
        self.embeddings = embeddings  # backend.embeddings.JobEmbeddings, or None
        self.should_stop = should_stop  # () -> bool: checked between encoder passes; raises JobInterrupted
        self.emphasis = emphasis
        self.max_chunks = max_chunks  # setting prompt_max_chunks, counted in CLIP's 75-token chunks
        self.encoder_devices = {k: torch.device(v) for k, v in (encoder_devices or {}).items()}
        self._cache: dict[tuple[str, bool], Conditioning] = {}
        needed = (*CLIP_ENCODERS[self.family], *(("t5xxl",) if self.family == "flux" or "t5xxl" in model.text_encoders
                                                  else ()))
        missing = [name for name in needed if name not in model.text_encoders or name not in model.tokenizers]
        if missing:
            raise ValueError(f"the {self.family} model lacks the text encoders {missing}")
        width = self._context_width()
        t5 = model.text_encoders.get("t5xxl")
        if t5 is not None and int(t5.config.d_model) != width:
            raise UserError(f"The T5 text encoder (width {t5.config.d_model}) does not fit this {self.family} model, "
                            f"whose text width is {width}. Choose the T5-XXL file made for it.")

    # -- public, as TextConditioner ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompt: str, is_negative: bool = False) -> Conditioning:
        prompt = prompt_parser.extract_extra_network_tags(prompt)[0]
        key = (prompt, is_negative)
        if key not in self._cache:
            self._cache[key] = self._encode(prompt, is_negative)
        return self._cache[key]

    def empty_chunk(self) -> torch.Tensor:
        """One padding unit: the empty prompt's context (FLUX: 256 T5 tokens; SD3: a CLIP chunk and a T5 block)."""
        return self.encode("").crossattn[: self.unit_tokens]

    @property
    def unit_tokens(self) -> int:
        """Every context's length is a multiple of this (the length of `empty_chunk()`)."""
        return T5_UNIT["flux"] if self.family == "flux" else CLIP_CHUNK + T5_UNIT["sd3"]

    def schedules(self, prompts: list[str], steps: int, is_negative: bool,
                  hires_steps: int | None = None) -> ScheduledConds:
        prompts = [prompt_parser.extract_extra_network_tags(p)[0] for p in prompts]
        plans = prompt_parser.get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps)
        return ScheduledConds([[(end, self.encode(text, is_negative)) for end, text in plan] for plan in plans])

    # -- encoding ----------------------------------------------------------------------------------------------
    def _encode(self, prompt: str, is_negative: bool) -> Conditioning:
        self._check_stop()
        clip_chunks = {}
        for name in CLIP_ENCODERS[self.family]:
            chunks, tokens = tokenize_prompt(self.model.tokenizers[name], prompt, _clip_pad_id(name),
                                             self.embeddings, parse_weights=self.emphasis != "None")
            if self.max_chunks is not None:
                check_chunk_count(len(chunks), tokens, "Negative prompt" if is_negative else "Prompt", self.max_chunks)
            clip_chunks[name] = chunks
        unit = T5_UNIT[self.family]
        t5_tokenizer = self.model.tokenizers["t5xxl"] if "t5xxl" in self.model.text_encoders else None
        t5_parts = _t5_parts(t5_tokenizer, prompt, self.emphasis != "None", unit)
        if self.family == "flux":
            pooled = self._clip(clip_chunks["clip_l"][0], "clip_l")[1]
            context = torch.cat([self._t5(tokens, mults) for tokens, mults in t5_parts], dim=0)
            return Conditioning(crossattn=context, pooled=pooled)
        return self._encode_sd3(clip_chunks, t5_parts)

    def _encode_sd3(self, clip_chunks: dict[str, list[PromptChunk]], t5_parts) -> Conditioning:
        width = self._context_width()
        n = max(max(len(c) for c in clip_chunks.values()), sum(len(t) for t, _ in t5_parts) // T5_UNIT["sd3"])
        for name, chunks in clip_chunks.items():  # the encoders' chunk counts may differ; T5 may need more
            while len(chunks) < n:
                chunks.extend(tokenize_prompt(self.model.tokenizers[name], "", _clip_pad_id(name))[0])
        clip_rows, pooled = [], []
        for c in range(n):
            parts = []
            for name in CLIP_ENCODERS["sd3"]:
                hidden, pool = self._clip(clip_chunks[name][c], name)
                parts.append(hidden)
                if c == 0:
                    pooled.append(pool)
            row = torch.cat(parts, dim=-1)
            clip_rows.append(torch.nn.functional.pad(row, (0, width - row.shape[-1])))
        t5_tokens = sum(len(t) for t, _ in t5_parts)
        extra = n * T5_UNIT["sd3"] - t5_tokens  # more padding in the last T5 pass, so both halves have n units
        last_tokens, last_mults = t5_parts[-1]
        t5_parts[-1] = (last_tokens + [T5_PAD] * extra, last_mults + [1.0] * extra)
        if "t5xxl" in self.model.text_encoders:
            t5_rows = [self._t5(tokens, mults) for tokens, mults in t5_parts]
        else:  # SD3 without T5: zeros in its place, as the diffusers pipeline does
            t5_rows = [torch.zeros(n * T5_UNIT["sd3"], width, device=self.device)]
        return Conditioning(crossattn=torch.cat(clip_rows + t5_rows, dim=0), pooled=torch.cat(pooled, dim=-1))

    def _context_width(self) -> int:
        transformer = getattr(self.model, "transformer", None)
        width = getattr(getattr(transformer, "config", None), "joint_attention_dim", None)
        if width is None and "t5xxl" in self.model.text_encoders:
            width = self.model.text_encoders["t5xxl"].config.d_model
        return int(width or CONTEXT_WIDTH)

    def _clip(self, chunk: PromptChunk, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One 77-token chunk through a CLIP encoder: (penultimate hidden state [77, D] with the weights applied,
        pooled [P]: CLIP-L's pooled output, CLIP-G's projected one), float32 on the conditioning device."""
        self._check_stop()
        encoder = self.model.text_encoders[name]
        tokens = torch.tensor([chunk.tokens], device=self._device_of(name))
        index = CLIP_ENCODERS["sd3"].index(name)
        if chunk.fixes and self.embeddings:
            out = run_with_embeddings(encoder, tokens, chunk.fixes,
                                      lambda emb: self.embeddings.vectors(emb, index))
        else:
            out = encoder(input_ids=tokens, output_hidden_states=True)
        pooled = out.text_embeds if name == "clip_g" else out.pooler_output
        hidden = out.hidden_states[-2][0].to(self.device, torch.float32)
        return emphasize(hidden, chunk.multipliers, self.emphasis), pooled[0].to(self.device, torch.float32)

    def _t5(self, tokens: list[int], multipliers: list[float]) -> torch.Tensor:
        """One T5 pass: last hidden state [len, 4096] with the weights applied, float32 on the conditioning device."""
        self._check_stop()
        ids = torch.tensor([tokens], device=self._device_of("t5xxl"))
        hidden = self.model.text_encoders["t5xxl"](input_ids=ids).last_hidden_state[0]
        return emphasize(hidden.to(self.device, torch.float32), multipliers, self.emphasis)

    def _device_of(self, name: str) -> torch.device:
        return self.encoder_devices.get(name, self.device)

    def _check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise JobInterrupted()


def _clip_pad_id(name: str) -> int:
    # OpenAI's CLIP-L pads with its end token, OpenCLIP's bigG with 0 ("!"), as SDXL and SD3's reference code.
    return ID_END if name == "clip_l" else 0


def _t5_parts(tokenizer, prompt: str, parse_weights: bool, unit: int) -> list[tuple[list[int], list[float]]]:
    """The prompt's BREAK-separated parts as T5 token lists with their weights: the tokens, `</s>`, then `<pad>` to
    a multiple of `unit`. Without a T5 tokenizer (SD3 without T5), one empty unit."""
    if tokenizer is None:
        return [([T5_EOS] + [T5_PAD] * (unit - 1), [1.0] * unit)]
    parsed = prompt_parser.parse_prompt_attention(prompt) if parse_weights else [[prompt, 1.0]]
    tokenized = tokenizer([text for text, _ in parsed], add_special_tokens=False)["input_ids"]
    parts: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    mults: list[float] = []

    def close() -> None:
        nonlocal tokens, mults
        body, weights = tokens + [T5_EOS], mults + [1.0]
        pad = -len(body) % unit
        parts.append((body + [T5_PAD] * pad, weights + [1.0] * pad))
        tokens, mults = [], []

    for ids, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            close()
            continue
        tokens += ids
        mults += [weight] * len(ids)
    if tokens or not parts:
        close()
    return parts


def emphasize(z: torch.Tensor, multipliers: list[float], emphasis: str) -> torch.Tensor:
    """Token weights applied to hidden states [T, D] as the emphasis mode says (A1111's modes)."""
    if emphasis in ("None", "Ignore"):
        return z
    mult = torch.tensor(multipliers, device=z.device, dtype=z.dtype).reshape(-1, 1)
    if emphasis == "No norm":
        return z * mult
    original_mean = z.mean()
    z = z * mult
    return z * (original_mean / z.mean())
