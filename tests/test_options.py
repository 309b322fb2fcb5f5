"""Settings: validation, persistence in config.json, the output-folder guard, flags."""
from __future__ import annotations

import json

import pytest

from backend.core.cmd_args import parse_args, parse_logins
from backend.core.errors import UserError
from backend.core.options import Options


def test_defaults_update_and_persist(tmp_path):
    path = tmp_path / "config.json"
    opts = Options(path, tmp_path)
    assert opts["sd_checkpoints_limit"] == 2
    opts.update({"sd_checkpoints_limit": "3", "live_previews_enable": "false", "my_extension_key": [1, 2]})
    again = Options(path, tmp_path)
    assert again["sd_checkpoints_limit"] == 3
    assert again["live_previews_enable"] is False
    assert again["my_extension_key"] == [1, 2]
    assert json.loads(path.read_text())["sd_checkpoints_limit"] == 3


@pytest.mark.parametrize("changes", [
    {"sd_checkpoints_limit": 0},
    {"sd_checkpoints_limit": "many"},
    {"samples_format": "py"},
    {"outdir_txt2img_samples": "/etc"},
    {"outdir_txt2img_samples": "outputs/../backend"},
    {"show_progress_every_n_steps": 999},
])
def test_invalid_settings_are_refused(tmp_path, changes):
    opts = Options(tmp_path / "config.json", tmp_path)
    with pytest.raises(UserError):
        opts.update(changes)


def test_output_folders_inside_outputs_are_fine(tmp_path):
    opts = Options(tmp_path / "config.json", tmp_path)
    opts.update({"outdir_txt2img_samples": "outputs/mine"})
    assert opts.output_dir("outdir_txt2img_samples") == tmp_path / "outputs" / "mine"


def test_frozen_settings(tmp_path):
    opts = Options(tmp_path / "config.json", tmp_path, frozen=True)
    with pytest.raises(UserError):
        opts.update({"sd_checkpoints_limit": 3})


def test_broken_config_file_is_a_clear_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        Options(path, tmp_path)


def test_flags():
    args = parse_args(["--listen", "--api", "--medvram", "--use-cpu", "gfpgan", "esrgan", "--ckpt-dir", "/x"])
    assert args.listen and args.api and args.medvram and args.port == 7860
    assert args.use_cpu == ["gfpgan", "esrgan"]
    assert parse_args(["--nowebui"]).port == 7861
    assert parse_logins("a:b, c:d:e") == [("a", "b"), ("c", "d:e")]
    with pytest.raises(ValueError):
        parse_logins("nocolon")
