"""The checkpoints a generation request names besides its own (torch-free; the app resolves them, the engine switches
to them mid-job): the refiner (A1111 1.6+'s `refiner_checkpoint`, which takes over sampling at `refiner_switch_at`)
and the checkpoint of the hires. fix pass (`hr_checkpoint_name`)."""
from __future__ import annotations

NO_REFINER = (None, "", "None", "none")  # the values A1111's clients send for "no refiner"
SAME_CHECKPOINT = "Use same checkpoint"  # A1111's "hires. pass with the job's own checkpoint"


def refiner_name(req) -> str | None:
    """The refiner checkpoint a request names; None for none."""
    name = getattr(req, "refiner_checkpoint", None)
    return None if name in NO_REFINER else str(name)


def hires_checkpoint_name(req) -> str | None:
    """The checkpoint of a request's hires. fix pass (used only with enable_hr); None for the job's own."""
    name = getattr(req, "hr_checkpoint_name", None)
    if not getattr(req, "enable_hr", False) or name in (None, "", SAME_CHECKPOINT):
        return None
    return str(name)
