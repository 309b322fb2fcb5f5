"""The app process's side of the Checkpoint Merger: a `MergeRequest` checked against the files on disk and turned
into the backend's `merge_checkpoints` job (`backend/engine/checkpoint_merger.py` runs it).

Everything that can be told from the files' headers is checked here, before the job is queued and without torch:
the models exist, the method has the models it needs, they are of one family (SD 1.x with SDXL is refused naming
both), their tensors fit together, the regular expression compiles, the output name is a plain file name that does
not exist yet in the checkpoint folder.
"""
from __future__ import annotations

from pathlib import Path

from backend.checkpoints import ModelFile, ModelRegistry
from backend.core.checkpoint_merge import (MergeRequest, channel_merge, checkpoint_family, default_name,
                                           discard_pattern, family_label, has_model_names, is_merged_key,
                                           normalize_key, output_file_name)
from backend.core.errors import UserError
from backend.core.tensor_headers import read_shapes


def merge_folder(paths, args) -> Path:
    """Where merged checkpoints go: --ckpt-dir when given (as A1111), else models/Stable-diffusion."""
    folder = Path(args.ckpt_dir).expanduser().resolve() if getattr(args, "ckpt_dir", None) else paths.ckpt_dirs[0]
    return Path(folder).resolve()


def _shapes(f: ModelFile) -> dict:
    return {normalize_key(k): v for k, v in read_shapes(f.path).items()}


def _config_beside(f: ModelFile | None) -> Path | None:
    if f is None:
        return None
    candidate = f.path.with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def plan_merge(req: MergeRequest, registry: ModelRegistry, folder: Path) -> dict:
    """The `merge_checkpoints` job's payload for `req`; `UserError` (4xx) for anything the headers show is wrong."""
    method = req.interp_method
    if not req.primary_model_name:
        raise UserError("Failed: Merging requires a primary model.")
    a = registry.find_checkpoint(req.primary_model_name)
    b = c = None
    if method in ("Weighted sum", "Add difference"):
        if not req.secondary_model_name:
            raise UserError("Failed: Merging requires a secondary model.")
        b = registry.find_checkpoint(req.secondary_model_name)
    if method == "Add difference":
        if not req.tertiary_model_name:
            raise UserError(f"Failed: Interpolation method ({method}) requires a tertiary model.")
        c = registry.find_checkpoint(req.tertiary_model_name)
    discard_pattern(req.discard_weights)  # a bad expression is refused now

    labelled = [(label, f) for label, f in (("A", a), ("B", b), ("C", c)) if f is not None]
    for label, f in labelled:  # quantized blocks are not numbers to add: merge the float files, quantize afterwards
        if Path(f.path).suffix.lower() == ".gguf":
            raise UserError(f"{f.name} ({label}) is a GGUF-quantized file; the Checkpoint Merger merges .safetensors "
                            "and .ckpt checkpoints. Merge the unquantized files, then quantize the result.")
    shapes = {label: _shapes(f) for label, f in labelled}
    for label, f in labelled:  # bitsandbytes 4-bit codes (Forge's bnb-nf4 files) are not numbers to add either
        if any(".quant_state.bitsandbytes__" in key for key in shapes[label]):
            raise UserError(f"{f.name} ({label}) is a bitsandbytes NF4 file; the Checkpoint Merger merges unquantized "
                            "checkpoints. Merge the unquantized files, then quantize the result.")
    families = {label: checkpoint_family(shapes[label]) for label, _f in labelled}
    for label, f in labelled[1:]:
        if families[label] != families["A"]:
            raise UserError(f"Cannot merge models of different families: {a.name} (A) is "
                            f"{family_label(families['A'])}, {f.name} ({label}) is {family_label(families[label])}.")

    # The tensors must fit together (A1111 finds out half-way): B - C where both have the key, then A with B.
    layout = has_model_names(shapes["A"])
    suffix = None
    if b is not None:
        for key, a_head in shapes["A"].items():
            b_head = shapes["B"].get(key)
            if b_head is None or not is_merged_key(key, layout) or not a_head.is_floating_point():
                continue
            if c is not None and key in shapes["C"]:
                if channel_merge(b_head.shape, shapes["C"][key].shape, key, "B", "C") is not None:
                    raise UserError(f"B and C do not fit together: {key} has shape {list(b_head.shape)} in B and "
                                    f"{list(shapes['C'][key].shape)} in C.")
            kind = channel_merge(a_head.shape, b_head.shape, key)
            suffix = suffix or kind

    generated = default_name(method, req.multiplier, a.model_name, b.model_name if b else None,
                             c.model_name if c else None)
    filename = output_file_name(req.custom_name, generated, suffix or "", req.checkpoint_format)
    target = (folder / filename).resolve()
    if target.parent != folder:
        raise UserError(f"The name {filename!r} would leave the checkpoint folder.")
    if target.exists():
        raise UserError(f"{target.name} already exists in {folder}; choose another custom name (Easel does not "
                        f"overwrite checkpoints).", status=409)

    vae = None
    if req.bake_in_vae and req.bake_in_vae != "None":
        vae = registry.find_vae(req.bake_in_vae)

    config = None
    choice = req.config_choice()
    if choice == "A, B or C":
        config = _config_beside(a) or _config_beside(b) or _config_beside(c)
    elif choice == "B":
        config = _config_beside(b)
    elif choice == "C":
        config = _config_beside(c)

    return {"request": req, "primary": a, "secondary": b, "tertiary": c, "vae": vae, "config": config,
            "target": target, "is_inpainting": suffix == "inpainting", "is_ip2p": suffix == "instruct-pix2pix"}
