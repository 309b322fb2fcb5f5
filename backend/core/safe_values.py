"""Values a JSON request may carry that Easel refuses everywhere: numbers that are not finite, integers beyond
64 bits and lone surrogates.

Python's JSON reader accepts `NaN`, `Infinity`, integers of any size and `"\\ud800"`: a NaN passes every range
check (all comparisons are false) and poisons the arithmetic after it; an integer beyond 64 bits fits no tensor,
seed or JSON writer of the response; a string with a lone surrogate cannot be encoded as UTF-8, so it fails
wherever it is written (tokenizer, PNG text, the response). All are refused at the edge, naming where they were
found, before any feature sees them.
"""
from __future__ import annotations

import math
import re

from backend.core.errors import UserError

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def unsafe_value_problem(value, where: str = "") -> str | None:
    """Why `value` (anything JSON can carry, nested) is refused, naming the first bad place; None when it is fine.

    Walks nested lists and dicts without recursion, so deeply nested input costs no stack.
    """
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{path or 'value'}: {item!r} is not a finite number."
        elif isinstance(item, int) and not isinstance(item, bool):
            if not INT64_MIN <= item <= INT64_MAX:
                return (f"{path or 'value'}: {item} is beyond the range of 64-bit integers "
                        f"(-2^63 to 2^63-1).")
        elif isinstance(item, str):
            m = _LONE_SURROGATE.search(item)
            if m:
                return (f"{path or 'value'}: the text has a lone UTF-16 surrogate (U+{ord(m.group()):04X}) at "
                        f"position {m.start() + 1}, which is not a character; send valid Unicode.")
        elif isinstance(item, dict):
            for key, child in item.items():
                key_text = str(key)
                if _LONE_SURROGATE.search(key_text):
                    return f"{path or 'value'}: a key has a lone UTF-16 surrogate; send valid Unicode."
                stack.append((child, f"{path}.{key_text}" if path else key_text))
        elif isinstance(item, (list, tuple)):
            for i, child in enumerate(item):
                stack.append((child, f"{path}[{i}]"))
    return None


def check_value(value, where: str = "", status: int = 422) -> None:
    """Raise UserError when `value` holds a non-finite number or a lone surrogate anywhere."""
    problem = unsafe_value_problem(value, where)
    if problem:
        raise UserError(problem, status=status)
