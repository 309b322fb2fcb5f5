"""The settings one job runs with, as the engine reads them.

The app process sends a job its settings as a plain dict (`Options.as_dict()` with the job's checked
`override_settings` merged in, by `backend.service`). `JobOptions` wraps that dict read-only: a setting the
dict lacks reads as the default declared for it in `backend.core.options.SETTINGS`, so no reader writes a
default a second time, and a key that is neither in the dict nor declared is a KeyError (a typo fails loudly).
Torch-free.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from backend.core.options import SETTINGS_BY_KEY


class JobOptions(Mapping[str, Any]):
    """Read-only settings of one job: the values sent with it, else the declared defaults."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None):
        self._values = dict(values or {})

    @classmethod
    def of(cls, values: Mapping[str, Any] | None) -> JobOptions:
        """`values` as JobOptions (itself when it already is)."""
        return values if isinstance(values, JobOptions) else cls(values)

    def __getitem__(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        setting = SETTINGS_BY_KEY.get(key)
        if setting is None:
            raise KeyError(key)
        return setting.default

    def __iter__(self) -> Iterator[str]:
        yield from self._values
        yield from (key for key in SETTINGS_BY_KEY if key not in self._values)

    def __len__(self) -> int:
        return len(self._values) + sum(1 for key in SETTINGS_BY_KEY if key not in self._values)

    def __repr__(self) -> str:
        return f"JobOptions({self._values!r})"
