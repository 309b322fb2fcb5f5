"""Putting LoRA updates into a loaded model's weights, and taking them out again exactly.

Targets: every Linear, Conv2d, GroupNorm and LayerNorm of the UNet and text encoders, under the
names LoRA files use for them (see `target_table`): the diffusers module path and, for the UNet,
its CompVis/SGM name too (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), both with "_" for ".";
text encoder modules as `text_model_encoder_layers_N_...` under part te1 (te2: SDXL's second).
FLUX/SD3 models (`families.flow_model.FlowModel`): the diffusers transformer's modules under their own names and
the original checkpoint's (`flow_targets`: fused layers such as BFL's `img_attn.qkv` are `FusedTarget`s, whose
update is split by rows onto to_q/to_k/to_v...), and the text encoders as te1/te2/te3 (`flow_text_encoders`).
A weight stored quantized (float8, GGUF: `lora_compute.stored_quantized`) is never changed: its LoRA is added
at compute time by a forward hook (`lora_compute`), removed with the rest.

Applying adds each update to the weight in float32, then rounds once to the weight's dtype; a plain
LoRA's up @ down goes straight into the weight (`add_updates`), without a full-size update tensor,
so a LoRA switch costs a fraction of a checkpoint load (benchmarks/bench_lora.py).
Before a weight is first changed, a copy of it goes to the CPU; removing the LoRAs copies it back,
so the weights are bit-for-bit what they were (no file is read again). A switch to other LoRAs keeps
the copies of the weights both sets change; removing all of them releases every copy. The set applied is remembered:
the next job with the same LoRAs and weights changes nothing.

In-place changes keep each tensor where the device policy put it (on the GPU, or in RAM for offloaded
parts, whose streamed copies are made from those RAM tensors), so placement and LoRAs stay independent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from backend.engine.loaded_model import LoadedModel
from backend.engine.networks.flow_targets import FusedTarget, flow_text_encoders, flux_targets, sd3_targets
from backend.engine.networks.lora_compute import LoraTerm, float32_weight, install as install_terms, module_device, \
    stored_quantized, weight_shape
from backend.engine.networks.lora_files import NetworkFile, ModuleWeights, ShapeMismatch, compute_update, \
    low_rank_factors, low_rank_update
from backend.networks.registry import FAMILY_LABELS

log = logging.getLogger("easel.lora")

TARGET_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


@dataclass
class ActiveNetwork:
    """One `<lora:...>` use: the file and its multipliers."""

    file: NetworkFile
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn_dim: int | None = None
    label: str = ""  # the name used in the prompt

    def signature(self) -> tuple:
        return (str(self.file.path), self.file.stamp, float(self.te_multiplier), float(self.unet_multiplier), self.dyn_dim)


@dataclass
class ApplyReport:
    """What happened to one network: modules applied, and the ones that did not fit."""

    name: str
    applied: int = 0
    unmatched: int = 0
    mismatched: int = 0
    unsupported: int = 0
    skipped_reason: str | None = None

    @property
    def used(self) -> bool:
        return self.skipped_reason is None and self.applied > 0


FLOW_FAMILIES = ("flux", "sd3")


def _is_target(module: torch.nn.Module) -> bool:
    return isinstance(module, TARGET_TYPES) or stored_quantized(module)


def _encoder_targets(table: dict, part: str, encoder: torch.nn.Module) -> None:
    """A text encoder's modules as LoRA files name them: `text_model_...` (CLIP; T5 gets the same prefix,
    which is what `lora_files` makes of every text encoder name), and CLIP's `text_projection`."""
    for name, module in encoder.named_modules():
        if not _is_target(module):
            continue
        full = name if name.startswith("text_model.") else "text_model." + name
        table[(part, full.replace(".", "_"))] = module
    proj = getattr(encoder, "text_projection", None)
    if isinstance(proj, torch.nn.Linear) or (proj is not None and stored_quantized(proj)):
        table[(part, "text_projection")] = proj


def flow_target_table(model) -> dict[tuple[str, str], object]:
    """`target_table` of a FLUX/SD3 model (`families.flow_model.FlowModel`): the diffusers transformer's modules
    under their own names and under the original checkpoint's (some as `FusedTarget`s), and the text encoders
    (te1/te2/te3 as the family's LoRAs mean them)."""
    table: dict[tuple[str, str], object] = {}
    transformer = model.transformer
    for name, module in transformer.named_modules():
        if _is_target(module):
            table[("unet", name.replace(".", "_"))] = module
    originals = flux_targets(transformer) if model.family == "flux" else sd3_targets(transformer)
    for name, target in originals.items():
        table.setdefault(("unet", name), target)
    for part, encoder in flow_text_encoders(model.family, dict(model.text_encoders or {})).items():
        _encoder_targets(table, part, encoder)
    return table


def split_update(mw: ModuleWeights, target, dyn_dim: int | None) -> list[tuple[torch.nn.Module, tuple]]:
    """One module's update for a fused layer (`FusedTarget`) or a quantized weight, split by rows onto the
    modules that hold it: [(module, ("lowrank", up rows, down) | ("full", delta rows, bias delta rows or None))],
    float32 on each module's device, before the user's multiplier. `down` is one tensor shared by the pieces.
    Raises `ShapeMismatch` / `ValueError` as `compute_update`."""
    pieces = target.pieces if isinstance(target, FusedTarget) else [(target, slice(None))]
    first = pieces[0][0]
    device = module_device(first)
    in_shape = weight_shape(first)[1:]
    rows = target.rows if isinstance(target, FusedTarget) else weight_shape(first)[0]
    shape = (rows, *in_shape)
    factors = low_rank_factors(mw, shape, device, dyn_dim=dyn_dim)
    if factors is not None:
        up, down = factors
        return [(m, ("lowrank", up[sel], down)) for m, sel in pieces]
    # Another module type: its full-size update, computed against the fused weight (LoHa/LoKr need only the
    # shape; IA3 and DoRA the values), then cut into the pieces' rows.
    weight = torch.empty(shape, dtype=torch.float32, device=device)
    for m, sel in pieces:
        weight[sel] = float32_weight(m).to(device).reshape(-1, *in_shape)
    biases = [getattr(m, "bias", None) for m, _ in pieces]
    bias = None
    if all(b is not None for b in biases):
        bias = torch.empty(rows, dtype=torch.float32, device=device)
        for (m, sel), b in zip(pieces, biases):
            bias[sel] = b.detach().to(device=device, dtype=torch.float32)
    updown, ex_bias = compute_update(mw, weight, dyn_dim=dyn_dim, bias=bias)
    return [(m, ("full", updown[sel], ex_bias[sel] if ex_bias is not None else None)) for m, sel in pieces]


def _route_pieces(pieces, multiplier: float, pending: list, pending_terms: list) -> None:
    """Each piece of a split update into the weight it belongs to (`pending`, merged), or, for a quantized
    weight, into a compute-time term (`pending_terms`); the multiplier applied once (`down` is shared)."""
    scaled: dict[int, torch.Tensor] = {}
    for module, (kind, a, b) in pieces:
        if kind == "lowrank":
            if id(b) not in scaled:
                scaled[id(b)] = b if multiplier == 1 else b * multiplier
            down = scaled[id(b)]
            if stored_quantized(module):
                pending_terms.append((module, LoraTerm(up=a, down=down)))
            else:
                pending.append((module, "weight", (a, down)))
            continue
        delta = a * multiplier
        bias = b * multiplier if b is not None else None
        if stored_quantized(module):
            pending_terms.append((module, LoraTerm(delta=delta.reshape(weight_shape(module)), bias=bias)))
            continue
        pending.append((module, "weight", delta.reshape(module.weight.shape)))
        if bias is not None and getattr(module, "bias", None) is not None:
            pending.append((module, "bias", bias.reshape(module.bias.shape)))


def target_table(model) -> dict[tuple[str, str], torch.nn.Module]:
    """{(part, name): module} for everything a LoRA may change (`NetworkPatcher` builds it once per model);
    for FLUX/SD3 models, `flow_target_table`."""
    if getattr(model, "family", None) in FLOW_FAMILIES:
        return flow_target_table(model)
    table = {}
    layout = None
    try:
        from backend.engine.ldm_convert import UNetLayout, unet_key_to_ldm
        layout = UNetLayout(model.spec.unet_config)
    except Exception:  # noqa: BLE001  an unusual UNet config: diffusers names only
        unet_key_to_ldm = None
    for name, module in model.unet.named_modules():
        if not isinstance(module, TARGET_TYPES):
            continue
        table[("unet", name.replace(".", "_"))] = module
        if layout is not None:
            ldm = unet_key_to_ldm(name + ".weight", layout)
            if ldm:
                table.setdefault(("unet", ldm[: -len(".weight")].replace(".", "_")), module)
    for index, encoder in enumerate(model.text_encoders):
        part = "te1" if index == 0 else f"te{index + 1}"
        for name, module in encoder.named_modules():
            if not isinstance(module, TARGET_TYPES):
                continue
            full = name if name.startswith("text_model.") else "text_model." + name
            table[(part, full.replace(".", "_"))] = module
    # SDXL's projection (`text_projection`) sits outside `text_model` in transformers.
    if len(model.text_encoders) > 1:
        proj = getattr(model.text_encoders[1], "text_projection", None)
        if isinstance(proj, torch.nn.Linear):
            table[("te2", "text_projection")] = proj
    return table


def _scaled(update: torch.Tensor, multiplier: float) -> torch.Tensor:
    """`update * multiplier`, in place: `compute_update` hands out new tensors, so a full-size copy is saved."""
    return update if multiplier == 1 else update.mul_(multiplier)


Update = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # a full-size change, or LoRA factors (up, down)


def add_updates(param: torch.Tensor, updates: list[Update]) -> None:
    """`param += sum(updates)` in float32, rounded once to the parameter's dtype.

    A float32 parameter is changed in place; LoRA factor pairs are multiplied straight into it
    (`addmm_`), so no full-size update is allocated: on the CPU, fresh memory costs more than the math.
    """
    data = param.data
    acc = data if data.dtype == torch.float32 else data.to(torch.float32)
    rows = acc.view(acc.shape[0], -1) if acc.ndim and acc.is_contiguous() else None
    for update in updates:
        if isinstance(update, tuple):
            up, down = (x.to(acc.device) for x in update)
            if rows is not None:
                rows.addmm_(up, down)
            else:  # e.g. a channels_last conv weight
                acc.add_((up @ down).reshape(acc.shape))
        else:
            acc.add_(update.to(acc.device))
    if acc is not data:
        data.copy_(acc)


class NetworkPatcher:
    """Puts LoRAs into one loaded checkpoint's weights and takes them out; what is applied, and the
    originals, are kept in the checkpoint's `LoadedModel.lora` (so they stay with the model, whoever patches)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.state = loaded.lora

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def reports(self) -> list[ApplyReport]:
        return self.state.reports

    @torch.no_grad()
    def restore(self) -> None:
        """Every changed weight back to its original value (bit-exact), the backups released."""
        self._copy_back()
        self.state.backup.clear()

    def _copy_back(self) -> None:
        for module, attr, original in self.state.backup.values():
            getattr(module, attr).data.copy_(original)
        for handle in self.state.hooks:
            handle.remove()
        self.state.hooks = []
        self.state.signature = ()
        self.state.reports = []

    @torch.no_grad()
    def apply(self, networks: list[ActiveNetwork]) -> list[ApplyReport]:
        """Make the model's weights = originals + the updates of `networks` (nothing when already so)."""
        # The placement is part of it: a change of dtype or device since is redone from the originals.
        state = self.state
        wanted = (self.loaded.placed,) + tuple(n.signature() for n in networks) if networks else ()
        if wanted == state.signature:
            return state.reports
        if not networks:
            self.restore()
            return []
        # A switch: the originals go back, and their copies are kept for the weights the new set changes too.
        self._copy_back()
        earlier, state.backup = state.backup, {}
        family = getattr(self.model, "family", None)
        if state.targets is None:
            state.targets = target_table(self.model)
        table = state.targets
        sums: dict[int, list] = {}  # id(param) -> [module, attr, [updates]]
        terms: dict[int, tuple[torch.nn.Module, list[LoraTerm]]] = {}  # id(module) -> compute-time terms
        reports = []
        for net in networks:
            report = ApplyReport(name=net.label or net.file.name)
            reports.append(report)
            if net.file.family and family and net.file.family != family:
                report.skipped_reason = (f"it was made for {FAMILY_LABELS.get(net.file.family, net.file.family)} and the "
                                         f"loaded model is {FAMILY_LABELS.get(family, family)}")
                continue
            pending: list[tuple[torch.nn.Module, str, Update]] = []
            pending_terms: list[tuple[torch.nn.Module, LoraTerm]] = []  # quantized weights: added at compute time
            for mw in net.file.modules.values():
                module = table.get((mw.part, mw.name))
                if isinstance(module, FusedTarget) or (module is not None and stored_quantized(module)):
                    multiplier = net.te_multiplier if mw.is_text_encoder else net.unet_multiplier
                    try:
                        pieces = split_update(mw, module, net.dyn_dim)
                    except ShapeMismatch as exc:
                        log.debug("%s: %s does not fit: %s", report.name, mw.key, exc)
                        report.mismatched += 1
                        continue
                    except ValueError as exc:
                        log.debug("%s: %s: %s", report.name, mw.key, exc)
                        report.unsupported += 1
                        continue
                    report.applied += 1
                    if multiplier != 0:
                        _route_pieces(pieces, multiplier, pending, pending_terms)
                    continue
                if module is None or getattr(module, "weight", None) is None:
                    report.unmatched += 1
                    continue
                multiplier = net.te_multiplier if mw.is_text_encoder else net.unet_multiplier
                try:
                    factors = low_rank_update(mw, module.weight, dyn_dim=net.dyn_dim)
                    if factors is None:
                        bias = module.bias if getattr(module, "bias", None) is not None else None
                        updown, ex_bias = compute_update(mw, module.weight, dyn_dim=net.dyn_dim, bias=bias)
                except ShapeMismatch as exc:
                    log.debug("%s: %s does not fit: %s", report.name, mw.key, exc)
                    report.mismatched += 1
                    continue
                except ValueError as exc:
                    log.debug("%s: %s: %s", report.name, mw.key, exc)
                    report.unsupported += 1
                    continue
                report.applied += 1
                if multiplier == 0:
                    continue
                if factors is not None:
                    pending.append((module, "weight", (factors[0], _scaled(factors[1], multiplier))))
                    continue
                pending.append((module, "weight", _scaled(updown, multiplier)))
                if ex_bias is not None:
                    pending.append((module, "bias", _scaled(ex_bias, multiplier)))
            if report.applied == 0:
                report.skipped_reason = self._nothing_matched(net.file, report, family)
                continue
            for module, term in pending_terms:
                terms.setdefault(id(module), (module, []))[1].append(term)
            for module, attr, delta in pending:
                entry = sums.get(id(getattr(module, attr)))
                if entry is None:
                    sums[id(getattr(module, attr))] = [module, attr, [delta]]
                else:
                    entry[2].append(delta)
        for module, attr, updates in sums.values():
            param = getattr(module, attr)
            saved = earlier.pop(id(param), None) or (module, attr, param.detach().to("cpu", copy=True))
            state.backup[id(param)] = saved
            add_updates(param, updates)
        state.hooks = install_terms(terms)
        state.signature = wanted
        state.reports = reports
        return reports

    @staticmethod
    def _nothing_matched(file: NetworkFile, report: ApplyReport, family: str | None) -> str:
        total = len(file.modules)
        loaded = FAMILY_LABELS.get(family, family or "the loaded model")
        if report.mismatched and not report.unmatched:
            return (f"its {report.mismatched} modules have other shapes than the loaded {loaded} model's "
                    f"(made for another base model?)")
        if report.unsupported and not report.unmatched and not report.mismatched:
            kinds = ", ".join(sorted(file.kinds()))
            return f"its module types ({kinds}) are not supported"
        return (f"none of its {total} modules matches a layer of the loaded {loaded} model "
                f"(made for another base model?)")
