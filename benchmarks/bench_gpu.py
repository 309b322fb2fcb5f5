"""GPU benchmark: Easel's memory modes against plain diffusers fp16 + SDPA, and checkpoint switch times.

    venv/bin/python benchmarks/bench_gpu.py                       # SD 1.5 at 512 and SDXL at 1024, 20 steps
    venv/bin/python benchmarks/bench_gpu.py --families sd1 --steps 10

Without a CUDA GPU it prints why and exits with status 0 (nothing is measured).

Checkpoints: SD 1.5 and SDXL architectures with random weights, written once as real A1111-layout fp16
`.safetensors` files into --folder. For each family, at batch 1 and CFG 7 (so the UNet runs at batch 2)
with Euler: it/s (median step) and peak VRAM (`max_memory_allocated`, and what the allocator reserved)
for diffusers (`from_single_file`, fp16, SDPA), Easel default (automatic placement), --medvram, --lowvram
and --compile (timed after a warm-up image that compiles). Then the checkpoint switch: a cold load
(file read, page cache dropped where allowed) and a switch back to a cached checkpoint. The last column
checks the issue's targets: --lowvram peak under 1.5 GB (SD 1.5, 512) / 3 GB (SDXL, 1024) at no less than
half the default speed; default at least as fast as diffusers; --compile at least 1.4x diffusers.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from backend.engine.pipelines.common import StepClock  # noqa: E402  (after the path setup)

SIZES = {"sd1": 512, "sdxl": 1024}
MODES = {"default": [], "--medvram": ["--medvram"], "--lowvram": ["--lowvram"], "--compile": ["--compile"]}
LOWVRAM_PEAK_TARGET = {"sd1": 1.5e9, "sdxl": 3e9}
PROMPT = "a photograph of an astronaut riding a horse"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="sd1,sdxl")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    p.add_argument("--folder", type=Path, default=Path(os.environ.get("EASEL_BENCH_DIR", "/tmp/easel-bench")))
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-switch", action="store_true")
    return p.parse_args()


class CudaStepClock(StepClock):
    """Step times that include the GPU's queued work."""

    def step(self, preview):
        import torch
        torch.cuda.synchronize()
        super().step(preview)


def its(times: list[float]) -> float:
    steps = [b - a for a, b in zip(times, times[1:])]
    return 1.0 / statistics.median(steps) if steps else float("nan")


def reset_gpu() -> None:
    import torch
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def peaks() -> tuple[float, float]:
    import torch
    return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9


def bench_diffusers(family: str, ckpt: Path, args) -> dict:
    import torch
    from diffusers import (EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline)
    from diffusers.models.attention_processor import AttnProcessor2_0

    from _models import diffusers_config_folder

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_single_file(str(ckpt), config=str(diffusers_config_folder(family, args.folder)),
                                torch_dtype=torch.float16, local_files_only=True, **extra)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda")
    size = SIZES[family]
    times: list[float] = []

    def on_step(_p, _i, _t, kw):
        torch.cuda.synchronize()
        times.append(time.perf_counter())
        return kw

    def run(steps):
        times.clear()
        with torch.no_grad():
            pipe(PROMPT, negative_prompt="blurry", num_inference_steps=steps, height=size, width=size, guidance_scale=7,
                 generator=torch.Generator("cuda").manual_seed(1), callback_on_step_end=on_step)

    run(3)
    reset_gpu()
    run(args.steps)
    result = {"mode": "diffusers fp16 SDPA", "its": its(times), "peak": peaks()}
    del pipe
    reset_gpu()
    return result


def bench_easel(family: str, ckpt: Path, mode: str, args) -> dict:
    import torch

    from backend.checkpoints import ModelFile
    from backend.core.cmd_args import parse_args
    from backend.engine.devices import DevicePolicy
    from backend.engine.loaded_model import LoadedModel
    from backend.engine.model_loader import load_sd_model
    from backend.core.options import SETTINGS
    from backend.engine.pipelines import txt2img
    from backend.engine.pipelines.common import JobContext
    from backend.core.sampler_catalog import resolve_sampling
    from backend.core.schemas import Txt2ImgRequest

    options = {s.key: s.default for s in SETTINGS}
    options["live_previews_enable"] = False
    policy = DevicePolicy.from_args(parse_args(MODES[mode]))
    model = LoadedModel(load_sd_model(ckpt, dtype=policy.dtype, vae_dtype=policy.vae_dtype, text_dtype=policy.text_dtype))
    policy.place(model)
    clock = CudaStepClock()
    size = SIZES[family]

    def run(steps):
        req = Txt2ImgRequest(prompt=PROMPT, negative_prompt="blurry", seed=1, steps=steps, width=size, height=size,
                             cfg_scale=7, sampler_name="Euler", do_not_save_samples=True, do_not_save_grid=True)
        ctx = JobContext(loaded=model, policy=policy, options=options, outputs_root=args.folder,
                         checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=clock,
                         sampling=resolve_sampling(req, options["default_sampler"]))
        with torch.no_grad():
            txt2img.run(req, ctx)
        policy.settle(model)

    run(3)  # warm-up (compiles with --compile)
    reset_gpu()
    run(args.steps)
    result = {"mode": f"Easel {mode}", "its": its(clock.times), "peak": peaks(), "plan": policy.mode_for(model)}
    policy.release(model)
    del model
    reset_gpu()
    return result


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_switch(ckpts: dict, args) -> list[tuple[str, float]]:
    import torch

    from backend.checkpoints import HashCache
    from backend.core.cmd_args import parse_args
    from backend.engine.devices import DevicePolicy
    from backend.engine.worker import ModelCache

    policy = DevicePolicy.from_args(parse_args([]))
    cache = ModelCache(policy, HashCache(args.folder / "hashes.json"))
    rows = []
    names = list(ckpts)
    dropped = drop_page_cache()
    for name in names:
        t0 = time.perf_counter()
        cache.get(ckpts[name], limit=len(names))
        torch.cuda.synchronize()
        rows.append((f"cold load {name} ({'page cache dropped' if dropped else 'file in page cache'})",
                     time.perf_counter() - t0))
    for name in names:
        t0 = time.perf_counter()
        cache.get(ckpts[name], limit=len(names))
        torch.cuda.synchronize()
        where = "on the GPU" if policy.mode_for(cache.models[next(reversed(cache.models))]) == "resident" else "offloaded"
        rows.append((f"switch to cached {name} ({where})", time.perf_counter() - t0))
    cache.clear()
    reset_gpu()
    return rows


def main() -> None:
    args = parse()
    import torch
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU is available here; nothing was measured.")
        return
    from _models import random_checkpoint

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.steps} steps, Euler, CFG 7, batch 1\n")
    families = [f for f in args.families.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    ckpts = {f: random_checkpoint(f, args.folder) for f in families}
    for family in families:
        rows = [] if args.skip_diffusers else [bench_diffusers(family, ckpts[family], args)]
        for mode in modes:
            rows.append(bench_easel(family, ckpts[family], mode, args))
            print(f"  {family} {rows[-1]['mode']}: {rows[-1]['its']:.2f} it/s, peak {rows[-1]['peak'][0]:.2f} GB",
                  flush=True)
        by = {r["mode"]: r for r in rows}
        base = by.get("diffusers fp16 SDPA")
        default = by.get("Easel default")
        size = SIZES[family]
        print(f"\n{family} {size}x{size}")
        print("| mode | it/s | vs diffusers | peak VRAM allocated GB | reserved GB | target |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            target = ""
            if r["mode"] == "Easel --lowvram" and default:
                ok = r["peak"][0] * 1e9 < LOWVRAM_PEAK_TARGET[family] and r["its"] >= 0.5 * default["its"]
                target = f"peak < {LOWVRAM_PEAK_TARGET[family] / 1e9:g} GB, >= 0.5x default: {'met' if ok else 'MISSED'}"
            elif r["mode"] == "Easel default" and base:
                target = f">= diffusers: {'met' if r['its'] >= base['its'] else 'MISSED'}"
            elif r["mode"] == "Easel --compile" and base:
                target = f">= 1.4x diffusers: {'met' if r['its'] >= 1.4 * base['its'] else 'MISSED'}"
            ratio = f"{r['its'] / base['its']:.2f}x" if base else "-"
            plan = f" ({r['plan']})" if r.get("plan") else ""
            print(f"| {r['mode']}{plan} | {r['its']:.2f} | {ratio} | {r['peak'][0]:.2f} | {r['peak'][1]:.2f} | {target} |")
        print()
    if not args.skip_switch:
        print("| checkpoint switch | seconds |")
        print("| --- | --- |")
        for label, seconds in bench_switch(ckpts, args):
            print(f"| {label} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
