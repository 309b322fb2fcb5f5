"""Prompt styles: the `styles.csv` files, and how a style goes into a prompt (AUTOMATIC1111's `modules/styles.py`).

A style is a row `name,prompt,negative_prompt` of a CSV file (older files have `name,text`). Applying it: a style
text containing `{prompt}` wraps the prompt (the placeholder is replaced by it), any other style text is appended
after `, `; several styles apply in the order given, to the prompt and to the negative prompt alike. A name that no
file holds applies nothing (as AUTOMATIC1111), and the job's warnings say so.

The files: `--styles-file` (several allowed, each may be a glob such as `styles/*.csv`), by default
`DATA_DIR/styles.csv`. A style keeps the file it came from; a new style goes into the first file. Saving writes the
whole file anew through a temporary file (a crash leaves the old file, never half of one) after copying the old one to
`styles.csv.bak`, as AUTOMATIC1111 keeps a backup.

Standard library only: the app process owns the database; a job carries the texts of the styles it names
(`StyleDatabase.table`), which the backend applies with `apply_styles`.
"""
from __future__ import annotations

import csv
import glob
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from backend.core.errors import UserError

PLACEHOLDER = "{prompt}"
CSV_FIELDS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    path: str = ""  # the file it is kept in

    def as_api(self) -> dict:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompt(style_text: str, prompt: str) -> str:
    """One style text applied to a prompt: `{prompt}` replaced by the prompt, or the text appended after `, `."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, style_texts: list[str]) -> str:
    for text in style_texts:
        prompt = merge_prompt(text, prompt)
    return prompt


def styled_prompts(prompt: str, negative: str, names: list[str] | None,
                   table: dict[str, tuple[str, str]] | None) -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied; `table` is {name: (prompt, negative)} as a job
    carries it (`StyleDatabase.table`); names it lacks apply nothing."""
    chosen = [table[n] for n in names or [] if table and n in table]
    return apply_styles(prompt, [p for p, _ in chosen]), apply_styles(negative, [n for _, n in chosen])


def _remove_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    """The prompt without one style's text, if the prompt ends with it (or is wrapped by its `{prompt}` form)."""
    prompt, style_text = prompt.strip(), style_text.strip()
    if PLACEHOLDER in style_text:
        left, _, right = style_text.partition(PLACEHOLDER)
        if prompt.startswith(left) and prompt.endswith(right) and len(prompt) >= len(left) + len(right):
            return True, prompt[len(left):len(prompt) - len(right)]
        return False, prompt
    if prompt.endswith(style_text):
        rest = prompt[:len(prompt) - len(style_text)]
        return True, rest[:-2] if rest.endswith(", ") else rest
    return False, prompt


def style_files(patterns: list[str | Path]) -> tuple[Path, list[Path]]:
    """(the file new styles go into, every styles file) for the `--styles-file` values; globs are expanded in order,
    a plain path counts even before it exists (saving creates it)."""
    files: list[Path] = []
    default: Path | None = None
    for pattern in patterns:
        text = str(pattern)
        if any(c in os.path.basename(text) for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(text))]
            if default is None:
                default = found[0] if found else Path(os.path.dirname(text) or ".") / "styles.csv"
                files.append(default)
            files += found
        else:
            files.append(Path(text))
            default = default or Path(text)
    unique = list(dict.fromkeys(p.expanduser().resolve() for p in files))
    return (default.expanduser().resolve() if default else unique[0]), unique


class StyleDatabase:
    """The styles of every styles file, by name (a later file's style of the same name wins, as AUTOMATIC1111)."""

    def __init__(self, patterns: list[str | Path]):
        self.default_path, self.files = style_files(patterns)
        self._styles: dict[str, PromptStyle] = {}
        self._lock = threading.Lock()
        self.errors: list[str] = []  # files that could not be read, with why (logged by the service)
        self._stamps: tuple = ()
        self.reload()

    def _file_stamps(self) -> tuple:
        stamps = []
        for path in self.files:
            try:
                st = path.stat()
                stamps.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _fresh(self) -> None:
        """Read the files again when one changed on disk (a style edited in a text editor shows without a restart)."""
        if self._file_stamps() != self._stamps:
            self.reload()

    def reload(self) -> None:
        stamps = self._file_stamps()
        styles: dict[str, PromptStyle] = {}
        errors = []
        for path in self.files:
            if not path.is_file():
                continue
            try:
                with open(path, encoding="utf-8-sig", newline="") as f:
                    for row in csv.DictReader(f, skipinitialspace=True):
                        name = (row.get("name") or "").strip()
                        if not name or name.startswith("#"):  # empty rows and comments
                            continue
                        prompt = row.get("prompt", row.get("text")) or ""
                        styles[name] = PromptStyle(name, prompt, row.get("negative_prompt") or "", str(path))
            except (OSError, UnicodeDecodeError, csv.Error) as exc:
                errors.append(f"styles file {path} could not be read: {exc}")
        with self._lock:
            self._styles = styles
            self.errors = errors
            self._stamps = stamps

    def names(self) -> list[str]:
        self._fresh()
        with self._lock:
            return list(self._styles)

    def all(self) -> list[PromptStyle]:
        self._fresh()
        with self._lock:
            return list(self._styles.values())

    def get(self, name: str) -> PromptStyle | None:
        self._fresh()
        with self._lock:
            return self._styles.get(name)

    def table(self, names: list[str]) -> dict[str, tuple[str, str]]:
        """{name: (prompt, negative prompt)} of the named styles that exist: what a job carries to the backend."""
        self._fresh()
        with self._lock:
            return {n: (self._styles[n].prompt, self._styles[n].negative_prompt) for n in names if n in self._styles}

    def unknown(self, names: list[str]) -> list[str]:
        self._fresh()
        with self._lock:
            return [n for n in names if n not in self._styles]

    def apply(self, prompt: str, negative: str, names: list[str]) -> tuple[str, str]:
        return styled_prompts(prompt, negative, names, self.table(names))

    def extract(self, prompt: str, negative: str) -> tuple[list[str], str, str]:
        """The styles whose texts a (pasted) prompt pair ends with, and the prompts without them: applying the
        returned styles to the returned prompts gives the pair back (AUTOMATIC1111's `extract_styles_from_prompt`,
        used when an infotext is pasted)."""
        candidates = [s for s in self.all() if s.prompt or s.negative_prompt]
        found: list[str] = []
        while True:
            for style in candidates:
                ok_pos, new_prompt = _remove_style_text(style.prompt, prompt)
                ok_neg, new_negative = _remove_style_text(style.negative_prompt, negative)
                if ok_pos and ok_neg:
                    prompt, negative = new_prompt, new_negative
                    candidates.remove(style)
                    found.append(style.name)
                    break
            else:
                return list(reversed(found)), prompt, negative

    # -- editing (the UI's style editor) ------------------------------------------------------------
    def save_style(self, name: str, prompt: str, negative: str) -> PromptStyle:
        name = (name or "").strip()
        if not name:
            raise UserError("A style needs a name.")
        if name.startswith("#") or "\n" in name or "\r" in name:
            raise UserError("A style name cannot start with # or hold a line break.")
        self._fresh()  # a file edited by hand since it was read: its new rows are kept
        with self._lock:
            old = self._styles.get(name)
            style = PromptStyle(name, prompt or "", negative or "", old.path if old else str(self.default_path))
            self._styles[name] = style
            self._write(Path(style.path))
            self._stamps = self._file_stamps()
        return style

    def delete_style(self, name: str) -> None:
        self._fresh()
        with self._lock:
            style = self._styles.pop(name, None)
            if style is None:
                raise UserError(f"There is no style named {name!r}.", status=404)
            self._write(Path(style.path))
            self._stamps = self._file_stamps()

    def _write(self, path: Path) -> None:
        """Write the styles kept in `path` (under the lock), atomically, the old file kept as `.bak`."""
        rows = [s for s in self._styles.values() if s.path == str(path)]
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.copyfile(path, path.with_name(path.name + ".bak"))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8-sig", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                writer.writeheader()
                for s in rows:
                    writer.writerow({k: v for k, v in asdict(s).items() if k in CSV_FIELDS})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
