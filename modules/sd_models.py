"""AUTOMATIC1111's `modules.sd_models`, for what a script asks of the checkpoints: `CheckpointInfo` (`title`
"name [short hash]", `filename`, `name`, `model_name`, `hash`, `sha256`, `shorthash`), `select_checkpoint()` (the
running job's checkpoint; in the app process the selected one, setting `sd_model_checkpoint`), and in the app
process (`ui()`, callbacks) the checkpoints on disk: `checkpoints_list` ({title: CheckpointInfo}), `list_models()`,
`checkpoint_tiles()`, `get_closet_checkpoint_match(name)`. Loading or switching models is Easel's (the request's
`override_settings.sd_model_checkpoint`), not a script's."""
from __future__ import annotations

from dataclasses import dataclass

from modules.context import current, missing

__all__ = ["CheckpointInfo", "list_models", "checkpoint_tiles", "select_checkpoint", "get_closet_checkpoint_match"]
PROVIDED = (*__all__, "checkpoints_list")  # checkpoints_list: read when asked for (module __getattr__)


@dataclass
class CheckpointInfo:
    """A1111's `CheckpointInfo` of a checkpoint file."""

    title: str
    filename: str
    name: str
    model_name: str
    hash: str | None
    sha256: str | None
    shorthash: str | None

    @classmethod
    def of(cls, model_file) -> "CheckpointInfo":
        """From Easel's `ModelFile` (backend.checkpoints)."""
        sha = model_file.sha256
        return cls(title=model_file.title, filename=str(model_file.path), name=model_file.name,
                   model_name=model_file.model_name, hash=sha[:8] if sha else None, sha256=sha,
                   shorthash=model_file.shorthash)


def _checkpoints(what: str) -> list[CheckpointInfo]:
    context = current(f"modules.sd_models.{what}")
    if context.checkpoints is None:
        raise RuntimeError(f"modules.sd_models.{what} is only available in Easel's app process (ui(), the app's "
                           "callbacks); in a job, select_checkpoint() gives the job's checkpoint.")
    return list(context.checkpoints())


def list_models() -> None:
    """A1111 rescans the folders; Easel's list is kept by the app (the UI's refresh button rescans)."""
    _checkpoints("list_models")


def checkpoint_tiles(use_short: bool = False) -> list[str]:
    return [c.title for c in _checkpoints("checkpoint_tiles")]


def select_checkpoint() -> CheckpointInfo | None:
    """The running job's checkpoint (in the app process: the one setting `sd_model_checkpoint` selects)."""
    context = current("modules.sd_models.select_checkpoint")
    if context.selected_checkpoint is None:
        raise RuntimeError("modules.sd_models.select_checkpoint is not available here.")
    return context.selected_checkpoint()


def get_closet_checkpoint_match(search_string: str) -> CheckpointInfo | None:
    """A1111's lookup by title, name or model name (then by a name that contains it)."""
    found = _checkpoints("get_closet_checkpoint_match")
    for info in found:
        if search_string in (info.title, info.name, info.model_name, info.filename):
            return info
    matches = sorted((i for i in found if search_string in i.title), key=lambda i: len(i.title))
    return matches[0] if matches else None


def __getattr__(name: str):
    if name == "checkpoints_list":
        return {info.title: info for info in _checkpoints("checkpoints_list")}
    raise missing(__name__, name)
