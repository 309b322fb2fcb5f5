"""What a generation job does with extra networks, in the backend process.

`activate_for_job(request, ctx, runtime)` runs once per job, after the model is fetched and before
the pipeline samples:

1. reads the `<lora:name:weight>` tags of the prompt and negative prompt (A1111's forms:
   `<lora:name>`, `<lora:name:w>`, `<lora:name:te:unet>`, `<lora:name:te:unet:dyn>`, named
   `te=`, `unet=`, `dyn=`; `<lyco:...>` is the same), and the `<hypernet:name:multiplier>` tags, whose
   files are hooked into the UNet's attention (`networks.hypernetworks`; a job without them removes them);
2. finds and reads each file (kept read while it is unchanged), puts their updates into the model's
   weights, or, with no tags, takes any earlier ones out: the weights are then exactly the checkpoint's;
3. writes `Lora hashes` into the job's infotext parameters, and a warning for every tag that could not
   be honoured (unknown name, damaged file, made for another base model, no matching layer);
4. gives the job the embeddings its prompts may use (`ctx.embeddings`, read by the text conditioner).

Nothing here raises for a bad tag or file: the job goes on without it. The tags stay in the prompt
(and so in the infotext); the text conditioner leaves them out of the text it encodes.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backend.core.errors import UserError
from backend.core.prompt_parser import extract_extra_network_tags
from backend.engine.networks.lora_apply import FLOW_FAMILIES, ActiveNetwork, NetworkPatcher
from backend.engine.networks.hypernetworks import ActiveHypernetwork, read_hypernetwork
from backend.engine.networks.lora_files import file_stamp, read_network_file
from backend.networks.registry import HypernetworkRegistry, LoraRegistry, NetworkHashes, short_hash

log = logging.getLogger("easel.lora")

LORA_TYPES = ("lora", "lyco")
HYPERNETWORK_TYPE = "hypernet"
FILE_CACHE_SIZE = 4  # LoRA files kept read beyond the ones in use


@dataclass
class LoraTag:
    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn_dim: int | None = None


def tag_text(kind: str, args: list[str]) -> str:
    return f"<{kind}:{':'.join(args)}>"


def parse_lora_args(args: list[str]) -> LoraTag:
    """A1111's reading of `<lora:...>` arguments; ValueError for a weight that is not a number."""
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    named = {k.strip(): v.strip() for k, v in named.items()}
    if not positional or not positional[0].strip():
        raise ValueError("the tag has no LoRA name")
    te = float(positional[1]) if len(positional) > 1 else 1.0
    te = float(named.get("te", te))
    unet = float(positional[2]) if len(positional) > 2 else te
    unet = float(named.get("unet", unet))
    dyn = int(positional[3]) if len(positional) > 3 else None
    dyn = int(named["dyn"]) if "dyn" in named else dyn
    return LoraTag(positional[0].strip(), te, unet, dyn)


def parse_network_tags(prompts: list[str]) -> tuple[list[LoraTag], list[str]]:
    """The LoRA tags of these prompts, in order, and warnings for the tags that cannot be read."""
    tags, warnings = [], []
    for prompt in prompts:
        for kind, args in extract_extra_network_tags(prompt or "")[1]:
            if kind.lower() == HYPERNETWORK_TYPE:  # parse_hypernetwork_tags reads those
                continue
            if kind.lower() not in LORA_TYPES:
                warnings.append(f"Unknown extra network type {kind!r} in {tag_text(kind, args)}; the tag was ignored.")
                continue
            try:
                tags.append(parse_lora_args(args))
            except ValueError as exc:
                warnings.append(f"{tag_text(kind, args)} could not be read ({exc}); the tag was ignored.")
    return tags, warnings


@dataclass
class HypernetworkTag:
    name: str
    multiplier: float = 1.0


def parse_hypernetwork_tags(prompts: list[str]) -> tuple[list[HypernetworkTag], list[str]]:
    """The `<hypernet:name>` / `<hypernet:name:multiplier>` tags of these prompts (A1111's reading: the first
    argument names the file, the second is the multiplier, default 1), and warnings for unreadable ones."""
    tags, warnings = [], []
    for prompt in prompts:
        for kind, args in extract_extra_network_tags(prompt or "")[1]:
            if kind.lower() != HYPERNETWORK_TYPE:
                continue
            if not args or not args[0].strip():
                warnings.append(f"{tag_text(kind, args)} names no hypernetwork; the tag was ignored.")
                continue
            try:
                multiplier = float(args[1]) if len(args) > 1 else 1.0
            except ValueError:
                warnings.append(f"{tag_text(kind, args)} could not be read (the multiplier is not a number); "
                                f"the tag was ignored.")
                continue
            tags.append(HypernetworkTag(args[0].strip(), multiplier))
    return tags, warnings


class ReadFiles:
    """Files read from disk by `reader(path, name)`, kept while unchanged (by size and mtime), the least recently
    used dropped beyond `keep`."""

    def __init__(self, reader: Callable[[Path, str], object]):
        self.reader = reader
        self.files: OrderedDict[str, tuple[tuple, object]] = OrderedDict()
        self.reads = 0  # files read from disk (tests check caching with it)

    def get(self, path: Path, name: str, keep: int):
        key, stamp = str(path), file_stamp(path)
        cached = self.files.get(key)
        if cached is not None and cached[0] == stamp:
            self.files.move_to_end(key)
            return cached[1]
        value = self.reader(path, name)
        self.reads += 1
        self.files[key] = (stamp, value)
        while len(self.files) > keep:
            self.files.popitem(last=False)
        return value


class NetworkRuntime:
    """The backend's extra-network state: finding LoRA and hypernetwork files, the files read, the embeddings."""

    def __init__(self, lora_dirs: list[Path], embeddings_dir: Path, cache_dir: Path | None = None,
                 hypernetwork_dirs: list[Path] | None = None):
        from backend.engine.embeddings import EmbeddingVectors

        self.loras = LoraRegistry(lora_dirs)
        self.hypernetworks = HypernetworkRegistry(list(hypernetwork_dirs or []))
        self.hashes = NetworkHashes(cache_dir / "network_hashes.json" if cache_dir else None)
        self.embeddings = EmbeddingVectors(embeddings_dir, self.hashes)
        self.lora_files = ReadFiles(read_network_file)
        self.hypernetwork_files = ReadFiles(read_hypernetwork)

    @classmethod
    def from_paths(cls, paths) -> "NetworkRuntime":
        return cls(paths.lora_dirs, paths.embeddings_dir, paths.cache_dir, paths.hypernetwork_dirs)

    @property
    def reads(self) -> int:
        """LoRA files read from disk."""
        return self.lora_files.reads


def _files_for_job(names: list[str], registry, files: ReadFiles, warnings: list[str], *, missing: str,
                   label: str) -> list:
    """(index into `names`, file read) for each name a file was found and read for (cached while unchanged); a
    warning for each that could not be (`missing`: A1111's word in "Couldn't find Lora with name x"; `label`: the
    kind of file in the other warnings). Never raises for a bad file: the job goes on without it."""
    found = []
    for index, name in enumerate(names):
        entry = registry.find_or_refresh(name)
        if entry is None:
            warnings.append(f"Couldn't find {missing} with name {name}")
            continue
        where = f"{label} {name} ({entry.path.name})"
        try:
            found.append((index, files.get(entry.path, entry.name, keep=len(names) + FILE_CACHE_SIZE)))
        except (UserError, OSError) as exc:
            warnings.append(f"{where} could not be used: {getattr(exc, 'message', exc)} Generation went on without it.")
        except Exception as exc:  # noqa: BLE001  a file no reader expected: the job still goes on
            log.exception("reading %s", entry.path)
            warnings.append(f"{where} could not be read ({type(exc).__name__}: {exc}). Generation went on without it.")
    return found


def activate_for_job(request, ctx, runtime: NetworkRuntime | None) -> None:
    """Apply the request's LoRAs to `ctx.loaded` (removing earlier ones), note hashes and warnings, set `ctx.embeddings`."""
    if runtime is None:
        return
    model = ctx.model
    tags, warnings, hyper_tags = ([], [], [])
    if request is not None and not getattr(request, "disable_extra_networks", False):
        tags, warnings = parse_network_tags([request.prompt, request.negative_prompt])
        hyper_tags, hyper_warnings = parse_hypernetwork_tags([request.prompt, request.negative_prompt])
        warnings += hyper_warnings
    networks = [ActiveNetwork(net, tags[i].te_multiplier, tags[i].unet_multiplier, tags[i].dyn_dim, label=tags[i].name)
                for i, net in _files_for_job([t.name for t in tags], runtime.loras, runtime.lora_files, warnings,
                                              missing="Lora", label="LoRA")]
    reports = NetworkPatcher(ctx.loaded).apply(networks)
    hashes = []
    for net, report in zip(networks, reports):
        where = f"LoRA {report.name} ({net.file.path.name})"
        if report.skipped_reason:
            warnings.append(f"{where} was not applied: {report.skipped_reason}. Generation went on without it.")
            continue
        left = report.unmatched + report.mismatched + report.unsupported
        if left:
            warnings.append(f"{where}: {left} of its {len(net.file.modules)} modules were not applied "
                            f"({report.unmatched} match no layer, {report.mismatched} have other shapes, "
                            f"{report.unsupported} are of an unsupported type).")
        if net.file.unknown_keys:
            shown = ", ".join(net.file.unknown_keys[:3]) + (", ..." if len(net.file.unknown_keys) > 3 else "")
            warnings.append(f"{where}: {len(net.file.unknown_keys)} of its tensors name no layer Easel knows "
                            f"({shown}); they were not applied.")
        try:
            full = runtime.hashes.lora_hash(net.file.path, net.file.metadata)
        except OSError:
            continue
        label = net.label.replace(":", "").replace(",", "")
        if f"{label}: {short_hash(full)}" not in hashes:
            hashes.append(f"{label}: {short_hash(full)}")
    if hashes:
        ctx.extra_params["Lora hashes"] = ", ".join(hashes)
    hypernetworks = [ActiveHypernetwork(net, hyper_tags[i].multiplier) for i, net in _files_for_job(
        [t.name for t in hyper_tags], runtime.hypernetworks, runtime.hypernetwork_files, warnings,
        missing="hypernetwork", label="Hypernetwork")]
    for name in ctx.loaded.hypernetworks.apply(model.unet, hypernetworks):
        warnings.append(f"Hypernetwork {name} has no layer of the widths this checkpoint's attention uses "
                        f"(made for another base model?); it was not applied.")
    for w in warnings:
        log.warning("%s", w)
        if w not in ctx.warnings:
            ctx.warnings.append(w)
    if getattr(model, "family", None) in FLOW_FAMILIES:
        ctx.embeddings = None  # textual inversion embeddings are SD 1.x/2.x/SDXL's (CLIP token vectors)
    else:
        ctx.embeddings = runtime.embeddings.for_job(model, ctx.extra_params, ctx.warnings)
