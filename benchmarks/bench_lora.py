"""LoRA switch benchmark: applying, removing and switching a rank-32 LoRA vs loading the checkpoint, on the CPU.

    venv/bin/python benchmarks/bench_lora.py                 # rank 32, 3 rounds (a few minutes)
    venv/bin/python benchmarks/bench_lora.py --rounds 1      # quicker

The checkpoint is SD 1.5's architecture with random weights (the fp16 A1111-layout file of
`_models.random_checkpoint`, 2 GB, written once into --folder). The two LoRAs are written once into its Lora/ folder,
as kohya's `networks.lora` writes them for SD 1.5: every Linear / 1x1 Conv2d inside the UNet's
Transformer2DModel blocks (proj_in, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2,
proj_out: 192 modules) and the text encoder's CLIPAttention / CLIPMLP layers (72), named
`lora_unet_..._to_q` / `lora_te_text_model_encoder_layers_..._q_proj`, with lora_down / lora_up / alpha,
stored in fp16 with kohya's ss_* metadata.

Everything runs through Easel's own code: `load_sd_model` with the `--use-cpu all` device policy (the file
dropped from the page cache first, so the load reads the disk; then once more with the file cached),
`read_network_file`, `NetworkPatcher.apply` (one ActiveNetwork; `[]` to remove) and, for the switch a job
does, `activate_for_job` with the prompt's `<lora:...>` tag. Each LoRA step is timed --rounds times and
the median given. At the end every UNet and text encoder tensor is compared (by a SHA-1 of its bytes) with
what it was before the first LoRA: the base weights must be restored bit for bit.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

# kohya networks.lora for SD 1.x: these module classes hold the layers it trains.
UNET_BLOCKS = ("Transformer2DModel",)
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--rounds", type=int, default=3, help="times each LoRA step is repeated (median shown)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, the physical cores)")
    p.add_argument("--folder", type=Path, default=Path(os.environ.get("EASEL_BENCH_DIR", "/tmp/easel-bench")),
                   help="where the random checkpoint and the LoRA files are written once and reused")
    p.add_argument("--skip-warm-load", action="store_true", help="time only the load from disk")
    return p.parse_args(argv)


def kohya_targets(model) -> dict[str, tuple]:
    """{kohya module name: weight shape} for the layers kohya's SD 1.x LoRA trains, from the loaded model."""
    import torch

    targets = {}

    def collect(root, prefix: str, block_types, conv: bool, name_prefix: str = ""):
        for block_name, block in root.named_modules():
            if type(block).__name__ not in block_types:
                continue
            for child_name, child in block.named_modules():
                fits = isinstance(child, torch.nn.Linear) or (
                    conv and isinstance(child, torch.nn.Conv2d) and tuple(child.kernel_size) == (1, 1))
                if fits:
                    full = f"{name_prefix}{block_name}.{child_name}"
                    targets[prefix + full.replace(".", "_")] = tuple(child.weight.shape)

    collect(model.unet, "lora_unet_", UNET_BLOCKS, conv=True)
    encoder = model.text_encoders[0]
    collect(encoder, "lora_te_", TEXT_BLOCKS, conv=False,
            name_prefix="" if any(n.startswith("text_model.") for n, _ in encoder.named_modules()) else "text_model.")
    return targets


def lora_file(folder: Path, tag: str, targets: dict[str, tuple], rank: int, alpha: float, seed: int) -> Path:
    """Write (once) a kohya-format LoRA with `targets`, rank `rank`, stored in fp16 as kohya saves it."""
    import torch

    from lora_factory import module_tensors, save_lora

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench-lora-sd1-r{rank}-{tag}.safetensors"
    if path.is_file():
        return path
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in targets.items():
        for suffix, value in module_tensors("lora", shape, gen, rank=rank, alpha=alpha).items():
            tensors[f"{name}.{suffix}"] = value.to(torch.float16) if suffix != "alpha" else value
    part = path.with_name(path.name + ".part.safetensors")
    save_lora(part, tensors, family="sd1", metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_output_name": path.stem})
    part.replace(path)
    return path


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def digests(modules) -> dict[tuple[int, str], bytes]:
    """A SHA-1 of every tensor's bytes: bit-exact comparison without a second copy of the weights in memory."""
    import torch

    return {(i, name): hashlib.sha1(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).digest()
            for i, module in enumerate(modules) for name, t in module.state_dict().items()}


def load(ckpt: Path, policy):
    from backend.engine.loaded_model import LoadedModel
    from backend.engine.model_loader import load_sd_model

    t0 = time.perf_counter()
    loaded = LoadedModel(load_sd_model(ckpt, dtype=policy.dtype, vae_dtype=policy.vae_dtype, text_dtype=policy.text_dtype))
    policy.place(loaded)
    return loaded, time.perf_counter() - t0


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    args = parse()
    import torch

    from backend.core.cmd_args import parse_args
    from backend.engine.devices import DevicePolicy, cpu_description
    from backend.engine.networks.activation import NetworkRuntime, activate_for_job
    from backend.engine.networks.lora_apply import ActiveNetwork, NetworkPatcher
    from backend.engine.networks.lora_files import read_network_file
    from backend.core.options import SETTINGS

    from _models import random_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {s.key: s.default for s in SETTINGS}
    policy = DevicePolicy.from_args(parse_args(["--use-cpu", "all"]), options=options)
    ckpt = random_checkpoint("sd1", args.folder)
    print(f"CPU: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    drop_from_page_cache(ckpt)
    loaded, cold_s = load(ckpt, policy)
    rows = [("load checkpoint, file not cached (load_sd_model + place)", [cold_s])]
    print(f"  cold load {cold_s:.1f} s", flush=True)
    if not args.skip_warm_load:
        del loaded
        gc.collect()
        loaded, warm_s = load(ckpt, policy)
        rows.append(("load checkpoint, file in page cache", [warm_s]))
        print(f"  warm load {warm_s:.1f} s", flush=True)
    torch.set_grad_enabled(False)
    model = loaded.model

    targets = kohya_targets(model)
    paths = [lora_file(args.folder / "Lora", tag, targets, args.rank, args.alpha, seed)
             for tag, seed in (("a", 1), ("b", 2))]
    unet_n = sum(k.startswith("lora_unet_") for k in targets)
    print(f"SD 1.5 architecture, random weights ({ckpt.name}), UNet {policy.dtype}, text encoder "
          f"{policy.text_dtype}".replace("torch.", ""))
    print(f"LoRAs: rank {args.rank}, alpha {args.alpha:g}, {unet_n} UNet + {len(targets) - unet_n} text encoder "
          f"modules, {paths[0].stat().st_size / 2**20:.0f} MB each ({paths[0].name}, {paths[1].name})\n", flush=True)

    parts = [model.unet, *model.text_encoders]
    originals = digests(parts)
    patcher = NetworkPatcher(loaded)
    files, read_times = [], []
    for path in paths:
        net, seconds = timed(lambda path=path: read_network_file(path))
        files.append(net)
        read_times.append(seconds)
    a, b = (ActiveNetwork(f, label=f.name) for f in files)

    reports, first_s = timed(lambda: patcher.apply([a]))
    assert reports[0].applied == len(targets) and not reports[0].skipped_reason, reports[0]
    changed = sum(digest != originals[key] for key, digest in digests(parts).items())
    timings: dict[str, list[float]] = {"apply": [], "remove": [], "switch": [], "job": []}
    patcher.apply([])
    for _ in range(args.rounds):  # from no LoRA: apply a, switch to b, remove b
        timings["apply"].append(timed(lambda: patcher.apply([a]))[1])
        timings["switch"].append(timed(lambda: patcher.apply([b]))[1])
        timings["remove"].append(timed(lambda: patcher.apply([]))[1])

    # The step every job runs before sampling: tags -> registry -> (cached) file -> patch, hashes noted.
    runtime = NetworkRuntime([args.folder / "Lora"], args.folder / "no-embeddings", cache_dir=None)
    names = [p.stem for p in paths]

    def job(name: str):
        ctx = SimpleNamespace(loaded=loaded, model=model, extra_params={}, warnings=[], embeddings=None)
        activate_for_job(SimpleNamespace(prompt=f"a castle <lora:{name}:1>", negative_prompt=""), ctx, runtime)
        assert not ctx.warnings and ctx.extra_params.get("Lora hashes", "").startswith(name), ctx.warnings

    job(names[0])  # reads both files once and hashes them, as the first jobs with them would
    job(names[1])
    for _ in range(args.rounds):
        job(names[0])
        timings["job"].append(timed(lambda: job(names[1]))[1])
    patcher.apply([])
    exact = digests(parts) == originals
    assert not patcher.backup

    rows += [(f"read a LoRA file (read_network_file, {len(targets)} modules)", read_times),
             ("apply LoRA, first time (builds the layer table)", [first_s]),
             ("apply LoRA (NetworkPatcher.apply([a]))", timings["apply"]),
             ("remove LoRA (apply([]): originals copied back)", timings["remove"]),
             ("switch LoRA a -> b (apply([b]) with a in)", timings["switch"]),
             ("switch in a job (activate_for_job, files already read)", timings["job"])]
    print("| step | seconds | checkpoint load (cold) / step |")
    print("| --- | --- | --- |")
    for label, values in rows:
        median = statistics.median(values)
        spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        print(f"| {label} | {median:.2f}{spread} | {cold_s / median:.0f}x |")
    print(f"\n{changed} tensors changed by the LoRA; base weights after removing it: "
          f"{'bit-exact' if exact else 'DIFFERENT'} (all {len(originals)} UNet and text encoder tensors compared)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if not exact:
        sys.exit(1)


if __name__ == "__main__":
    main()
