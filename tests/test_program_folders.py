"""Where the program finds itself: the default data dir and the program folder are the folder holding `app.py`
(as A1111's install folder), and the tokenizer's cache lies under it in the ignored `cache/`, wherever the module
that computes each one sits in the tree."""
from __future__ import annotations

import subprocess
from pathlib import Path

from backend.core.cmd_args import REPO_ROOT, parse_args
from backend.core.paths import PROGRAM_DIR, DataPaths

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_data_dir_is_the_program_folder():
    assert REPO_ROOT == ROOT and (REPO_ROOT / "app.py").is_file()
    assert PROGRAM_DIR == ROOT
    paths = DataPaths.from_args(parse_args([]))
    assert Path(paths.data_dir).resolve() == ROOT
    assert Path(paths.models_dir).resolve() == ROOT / "models"


def test_the_tokenizer_cache_lies_in_the_ignored_cache_folder():
    from backend.engine.tokenizer import DEFAULT_CACHE_DIR
    assert DEFAULT_CACHE_DIR == ROOT / "cache" / "clip_tokenizer"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DEFAULT_CACHE_DIR / "vocab.json")], cwd=ROOT)
    if (ROOT / ".git").exists():
        assert ignored.returncode == 0  # a cache the program writes is never a file git would add
