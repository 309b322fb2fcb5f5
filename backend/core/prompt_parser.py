"""AUTOMATIC1111's prompt syntax, without torch.

Three things live here:

* `parse_prompt_attention` - emphasis: ``(a)`` multiplies the weight of *a* by 1.1,
  ``[a]`` divides it by 1.1, ``(a:1.3)`` multiplies it by 1.3, nesting multiplies,
  ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters and a separate
  uppercase ``BREAK`` word becomes the item ``["BREAK", -1]``.
* `get_learned_conditioning_prompt_schedules` - prompt editing ``[from:to:when]``,
  ``[to:when]``, ``[from::when]`` and alternation ``[a|b|c]``, expanded into the
  list of texts used over the sampling steps.
* `extract_extra_network_tags` - removes ``<lora:name:1.0>``-style tags.

Differences from A1111, all on input A1111 cannot make sense of:

* ``BREAK`` inside brackets still breaks (A1111 multiplies the marker's weight of -1,
  so it silently turns into the text "BREAK").
* ``(a:1.2.3)``: a weight that is not a number leaves the ``:`` as text and the
  bracket weighs 1.1 (A1111 raises ValueError).
* A ``|`` that does not separate alternatives is plain text, so ``[{b|d{:.5]`` is
  the edit A1111's own doctest asks for, and ``a | b [c:3]`` still edits ``c``
  (A1111's grammar rejects both prompts and uses them as literal text).
* A backslash before a newline or at the very end is plain text.
* Where stray brackets or colons sit right beside a well-formed group (``[a:5]((``,
  ``[a:b:5]:)``), A1111's ambiguous grammar sometimes reads the whole prompt as text;
  here the group always counts. Prompts whose brackets pair up are not affected.
* Brackets nested deeper than `MAX_NESTING` levels are not read for schedules.
Otherwise the results are A1111's (checked against its grammar on random prompts).

Unbalanced brackets are accepted, as A1111 accepts them (chat bots write ``smiling :)``):
an unclosed ``(`` weighs everything after it by 1.1 and an unclosed ``[`` by 1/1.1, a
``)`` or ``]`` with nothing to close is text, and ``(red hair:1.2`` without its ``)``
keeps ``:1.2`` as text, weighed 1.1. For prompt editing, a bracket that does not open a
well-formed group is text: ``a [b:c:5] (x`` still edits, ``[a:b:5`` is plain text.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union


__all__ = [
    "parse_prompt_attention",
    "get_learned_conditioning_prompt_schedules",
    "extract_extra_network_tags",
    "RE_EXTRA_NETWORK",
]

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# `<lora:name:0.8>`: network type, then ":"-separated arguments (A1111's pattern).
RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


# ---------------------------------------------------------------------------------------------
# Emphasis
# ---------------------------------------------------------------------------------------------

# One token of emphasis syntax per match; the groups name the kind of token.
_RE_ATTENTION_TOKEN = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\])                        # \( \) \[ \] \\  -> the literal character
  | (?P<weight_close>:\s*(?P<weight>[+-]?[.\d]+)\s*\))  # ":1.3)" closes a "(" with that weight
  | (?P<open>[(\[])
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+ | : | \\)                # text; a lone ":" or "\" is text too
    """,
    re.VERBOSE,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class _Break:
    """The marker for a BREAK keyword: never weighted, never merged."""


_BREAK = _Break()


def parse_prompt_attention(text: str) -> list[list]:
    """Split `text` into ``[piece, weight]`` pairs, A1111's emphasis semantics.

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]

    Brackets left open at the end apply to everything after them; a closing bracket
    with nothing to close is text. Adjacent pieces of equal weight are merged, and
    an empty prompt gives ``[["", 1.0]]``.
    """
    pieces: list[list] = []  # [text or _BREAK, weight]
    open_round: list[int] = []  # index into `pieces` where each open bracket starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[0] is not _BREAK:
                piece[1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_RE_BREAK.split(chunk)):
            if i > 0:
                pieces.append([_BREAK, -1])
            pieces.append([part, 1.0])

    pos = 0
    while pos < len(text):
        m = _RE_ATTENTION_TOKEN.match(text, pos)
        token = m.group(0)
        kind = m.lastgroup if m.lastgroup != "weight" else "weight_close"
        pos = m.end()
        if kind == "escaped":
            pieces.append([token[1], 1.0])
        elif kind == "open":
            (open_round if token == "(" else open_square).append(len(pieces))
        elif kind == "weight_close":
            weight = _to_float(m.group("weight"))
            if not open_round:
                add_text(token)
            elif weight is None:
                # Not a number: keep the ":" as text and read on from just after it.
                add_text(":")
                pos = m.start() + 1
            else:
                scale_from(open_round.pop(), weight)
        elif kind == "close":
            stack = open_round if token == ")" else open_square
            if stack:
                scale_from(stack.pop(), ROUND_MULTIPLIER if token == ")" else SQUARE_MULTIPLIER)
            else:
                add_text(token)
        else:
            add_text(token)

    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not pieces:
        return [["", 1.0]]

    merged: list[list] = []
    for piece in pieces:
        prev = merged[-1] if merged else None
        if prev is not None and prev[0] is not _BREAK and piece[0] is not _BREAK and prev[1] == piece[1]:
            prev[0] += piece[0]
        else:
            merged.append(piece)
    return [["BREAK", -1] if p[0] is _BREAK else p for p in merged]


def _to_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation
# ---------------------------------------------------------------------------------------------

# Deeper bracket nesting than this is not read for schedules (the parser recurses per level).
MAX_NESTING = 100

# A1111's grammar uses lark's SIGNED_NUMBER: 3, -2, .5, 3., 1e3, 2.5E-1
_RE_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; `before` is None for ``[after:when]``."""
    before: tuple | None
    after: tuple
    when: str  # the number as written: a "." makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    """``[a|b|c]``: option ``(step - 1) % len(options)`` on each step."""
    options: tuple


# A parsed prompt is a tuple of nodes: text, a nested tuple (kept brackets), an edit or
# an alternation.
_Node = Union[str, tuple, _Edit, _Alternate]


class _ScheduleParser:
    """Recursive descent over A1111's prompt-editing grammar.

    At the top level a bracket that does not open a well-formed group is text; inside
    a group everything must be well formed, or the whole group is text.
    """

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[_Node, int] | None] = {}

    def parse(self) -> tuple:
        text, out, pos = self.text, [], 0
        while pos < len(text):
            ch = text[pos]
            if ch in "([":
                group = self.group(pos)
                if group is not None:
                    out.append(group[0])
                    pos = group[1]
                    continue
            step = 2 if ch == "\\" and pos + 1 < len(text) else 1
            out.append(text[pos:pos + step])
            pos += step
        return _join_text(out)

    def group(self, pos: int) -> tuple[_Node, int] | None:
        """The group opening at `pos` and the position after it, or None if malformed."""
        if pos not in self.memo:
            self.memo[pos] = self._round(pos) if self.text[pos] == "(" else self._square(pos)
        return self.memo[pos]

    def sequence(self, pos: int, stops: str) -> tuple[tuple, int] | None:
        """Nodes up to the next unnested character of `stops` (or the end of the text)."""
        text, out = self.text, []
        while pos < len(text):
            ch = text[pos]
            if ch in stops:
                break
            if ch in "([":
                group = self.group(pos)
                if group is None:
                    return None
                out.append(group[0])
                pos = group[1]
            elif ch in ")]:":
                return None  # a stray bracket or colon inside a group
            else:
                step = 2 if ch == "\\" and pos + 1 < len(text) else 1
                out.append(text[pos:pos + step])
                pos += step
        return _join_text(out), pos

    def _round(self, pos: int) -> tuple[_Node, int] | None:
        first = self.sequence(pos + 1, "):")
        if first is None or first[1] >= len(self.text):
            return None
        nodes, pos = first
        if self.text[pos] == ")":
            return ("(", *nodes, ")"), pos + 1
        second = self.sequence(pos + 1, "):")
        if second is None or second[1] >= len(self.text) or self.text[second[1]] != ")":
            return None
        return ("(", *nodes, ":", *second[0], ")"), second[1] + 1

    def _square(self, pos: int) -> tuple[_Node, int] | None:
        segments: list[tuple] = []
        separators: list[str] = []
        pos += 1
        while True:
            part = self.sequence(pos, "]:|")
            if part is None or part[1] >= len(self.text):
                return None
            segments.append(part[0])
            pos = part[1] + 1
            sep = self.text[part[1]]
            if sep == "]":
                break
            separators.append(sep)
        end = pos

        if not separators:
            return ("[", *segments[0], "]"), end
        colons = separators.count(":")
        if colons == 0:
            return _Alternate(tuple(segments)), end
        when = _number_of(segments[-1])
        if separators[-1] != ":" or colons > 2 or when is None:
            return None
        # A "|" that is not an alternation is text: rebuild the parts around the colons.
        parts: list[list] = [list(segments[0])]
        for sep, segment in zip(separators[:-1], segments[1:-1]):
            if sep == ":":
                parts.append(list(segment))
            else:
                parts[-1].extend(("|", *segment))
        if len(parts) == 1:
            return _Edit(None, _join_text(parts[0]), when), end
        return _Edit(_join_text(parts[0]), _join_text(parts[1]), when), end


def _join_text(nodes: list) -> tuple:
    """Merge adjacent strings, so the tree stays small."""
    out: list = []
    for node in nodes:
        if isinstance(node, str) and out and isinstance(out[-1], str):
            out[-1] += node
        else:
            out.append(node)
    return tuple(out)


def _nesting_depth(text: str) -> int:
    """How deeply brackets nest, counting unclosed ones (escaped brackets do not count)."""
    depth = deepest = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]" and depth:
            depth -= 1
    return deepest


def _number_of(segment: tuple) -> str | None:
    if not all(isinstance(n, str) for n in segment):
        return None
    m = _RE_WHEN.fullmatch("".join(segment))
    return m.group(1) if m else None


def get_learned_conditioning_prompt_schedules(
    prompts: list[str],
    steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[list[list]]:
    """For each prompt, ``[[end_step, text], ...]``: `text` is used up to and including `end_step`.

    The last entry ends at the number of steps. A ``when`` written with a "." is a
    fraction of the steps (``.5`` of 10 steps is step 5); without one it is a step
    number. For the hires pass (`hires_steps` given) steps count on from the first
    pass: an integer counts from the start of the first pass and a fraction starts at
    1.0 for the hires pass, so ``1.5`` is half way through it.
    `use_old_scheduling` is A1111's "old prompt editing timelines" option: a number
    below 1 is a fraction, any other number a step, and `hires_steps` is ignored.

    >>> get_learned_conditioning_prompt_schedules(["a [b:3]"], 10)
    [[[3, 'a '], [10, 'a b']]]
    """
    if hires_steps is None or use_old_scheduling:
        total, int_offset, float_offset = steps, 0, 0.0
    else:
        total, int_offset, float_offset = hires_steps, steps, 1.0

    def end_step(when: str) -> int:
        v = float(when)
        if use_old_scheduling:
            v = v * total if v < 1 else v
        elif "." in when:
            v = (v - float_offset) * total
        else:
            v = v - int_offset
        if math.isnan(v):
            return total
        return int(min(float(total), max(v, -1.0)))

    def collect(node: _Node, ends: set[int]) -> None:
        if isinstance(node, str):
            return
        if isinstance(node, tuple):
            for child in node:
                collect(child, ends)
        elif isinstance(node, _Edit):
            when = end_step(node.when)
            if when >= 1:
                ends.add(when)
            if node.before is not None:
                collect(node.before, ends)
            collect(node.after, ends)
        else:
            ends.update(range(1, total + 1))
            for option in node.options:
                collect(option, ends)

    def render(node: _Node, step: int) -> str:
        if isinstance(node, str):
            return node
        if isinstance(node, tuple):
            return "".join(render(child, step) for child in node)
        if isinstance(node, _Edit):
            if step <= end_step(node.when):
                return render(node.before, step) if node.before is not None else ""
            return render(node.after, step)
        return render(node.options[(step - 1) % len(node.options)], step)

    def schedule(prompt: str) -> list[list]:
        if _nesting_depth(prompt) > MAX_NESTING:
            return [[total, prompt]]  # unreadable, like any prompt A1111's grammar rejects
        tree = _ScheduleParser(prompt).parse()
        ends = {total}
        collect(tree, ends)
        return [[end, render(tree, end)] for end in sorted(ends)]

    cache: dict[str, list[list]] = {}
    result = []
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = schedule(prompt)
        result.append([list(entry) for entry in cache[prompt]])
    return result


# ---------------------------------------------------------------------------------------------
# Extra networks
# ---------------------------------------------------------------------------------------------

def extract_extra_network_tags(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """Remove ``<type:arg1:arg2...>`` tags; return the rest of the prompt and ``[(type, args), ...]``.

    >>> extract_extra_network_tags("a cat <lora:fluffy:0.8>")
    ('a cat ', [('lora', ['fluffy', '0.8'])])
    """
    found: list[tuple[str, list[str]]] = []

    def take(m: re.Match) -> str:
        found.append((m.group(1), m.group(2).split(":")))
        return ""

    return RE_EXTRA_NETWORK.sub(take, prompt), found
