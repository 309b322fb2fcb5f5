"""CPU benchmark: Easel's `--use-cpu all` txt2img vs plain diffusers float32, same checkpoint file, one run.

    venv/bin/python benchmarks/bench_cpu.py                      # 20 steps, 512x512 (minutes per image)
    venv/bin/python benchmarks/bench_cpu.py --steps 2 --size 256 # a quick check

The checkpoint is SD 1.5's architecture with random weights, written once as a real A1111-layout
`.safetensors` file (fp16, 2 GB) into --folder. Easel loads it through its own loader and device policy
(the dtypes `--use-cpu all` picks on this CPU: bfloat16 UNet/VAE where the CPU has bf16 hardware, else
float32) and runs its txt2img pipeline (Euler, CFG 7, batch 1). Diffusers loads the same file with
`StableDiffusionPipeline.from_single_file` in float32 and runs the same steps with its Euler scheduler.
Both run in this process one after the other, with the same thread count; the table gives seconds per
sampling step (median), seconds for the whole image (text encoding, sampling, VAE decode), and the ratio.
Other load on the machine moves both numbers; the ratio is the figure to read.

`--table` (issue 16's table) runs every row in its own process, so each has its own peak RSS: Easel's default
path, CFG 1 (the negative prompt's pass skipped), NGMS (`s_min_uncond` 1.0), LCM 4 steps (CFG 1) with the full VAE
and with TAESD as the final decoder (`sd_vae_decode_method`; random-weight TAESD files in the real layout are
written into --folder), token merging 0.5, and diffusers float32; seconds per image and peak RSS for each.

    venv/bin/python benchmarks/bench_cpu.py --table --steps 8     # about ten minutes on 2 cores at 512x512
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


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--folder", type=Path, default=Path(os.environ.get("EASEL_BENCH_DIR", "/tmp/easel-bench")),
                   help="where the random checkpoint is written once and reused")
    p.add_argument("--cpu-bf16", choices=("auto", "on", "off"), default="auto",
                   help="Easel's cpu_bf16 setting (on: bf16 even without hardware support, emulated and slow)")
    p.add_argument("--compile", action="store_true", help="also time Easel with --compile (inductor on the CPU)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--table", action="store_true", help="every row of issue 16's table, each in its own process")
    p.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)  # one row, in this process (--table)
    return p.parse_args()


# Issue 16's rows: (label, the request's changes, the settings' changes). Steps None = --steps.
ROWS = {
    "default": ("Easel default (Euler, CFG 7)", {}, {}),
    "cfg1": ("Easel CFG 1", {"cfg_scale": 1}, {}),
    "ngms": ("Easel NGMS s_min_uncond 1.0", {"s_min_uncond": 1.0}, {}),
    "lcm4": ("Easel LCM 4 steps, CFG 1", {"sampler_name": "LCM", "steps": 4, "cfg_scale": 1}, {}),
    "lcm4_taesd": ("Easel LCM 4 steps, CFG 1, TAESD decode", {"sampler_name": "LCM", "steps": 4, "cfg_scale": 1},
                   {"sd_vae_decode_method": "TAESD"}),
    "tome": ("Easel token merging 0.5", {}, {"token_merging_ratio": 0.5}),
    "diffusers": ("diffusers float32 (Euler, CFG 7)", {}, {}),
}


class PeakRSS:
    """The process's largest resident set size while the block runs (sampled every 20 ms), in GiB."""

    def __enter__(self):
        import threading

        import psutil
        self.peak, self._stop = 0, threading.Event()
        process = psutil.Process()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                self._stop.wait(0.02)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def write_random_taesd(folder: Path) -> Path:
    """Random-weight TAESD decoder/encoder files (SD 1.x) as the published .pth files are, in folder/VAE-taesd."""
    import torch

    from backend.engine.previews import taesd_decoder, taesd_encoder
    target = folder / "VAE-taesd"
    target.mkdir(parents=True, exist_ok=True)
    for name, build in (("taesd_decoder.pth", taesd_decoder), ("taesd_encoder.pth", taesd_encoder)):
        if not (target / name).exists():
            torch.save(build().state_dict(), target / name)
    return folder


def step_times(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def run_easel(ckpt: Path, args, flags: list[str], row: str = "default") -> dict:
    import torch

    from backend.checkpoints import ModelFile
    from backend.core.cmd_args import parse_args
    from backend.engine.devices import DevicePolicy
    from backend.engine.loaded_model import LoadedModel
    from backend.engine.model_loader import load_sd_model
    from backend.core.options import SETTINGS
    from backend.engine.pipelines import txt2img
    from backend.engine.pipelines.common import JobContext, StepClock
    from backend.core.sampler_catalog import resolve_sampling
    from backend.core.schemas import Txt2ImgRequest

    label, request_changes, option_changes = ROWS[row]
    options = {s.key: s.default for s in SETTINGS}
    options.update(cpu_bf16=args.cpu_bf16, live_previews_enable=False, **option_changes)
    policy = DevicePolicy.from_args(parse_args(["--use-cpu", "all", *flags]), options=options)
    t0 = time.perf_counter()
    model = LoadedModel(load_sd_model(ckpt, dtype=policy.dtype, vae_dtype=policy.vae_dtype, text_dtype=policy.text_dtype))
    policy.place(model)
    load_s = time.perf_counter() - t0
    clock = StepClock()
    fields = dict(prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry", seed=1,
                  steps=args.steps, width=args.size, height=args.size, cfg_scale=7, sampler_name="Euler",
                  do_not_save_samples=True, do_not_save_grid=True)
    fields.update(request_changes)
    req = Txt2ImgRequest(**fields)
    previews = None
    if options["sd_vae_decode_method"] == "TAESD":
        from backend.engine.previews import PreviewDecoders
        previews = PreviewDecoders(write_random_taesd(args.folder), allow_download=False)
    ctx = JobContext(loaded=model, policy=policy, options=options, outputs_root=args.folder,
                     checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=clock,
                     sampling=resolve_sampling(req, options["default_sampler"]), previews=previews)
    if "--compile" in flags:  # the first image at a size compiles; time the second
        warm = time.perf_counter()
        txt2img.run(req, ctx)
        load_s += time.perf_counter() - warm
    t0 = time.perf_counter()
    with torch.no_grad(), PeakRSS() as rss:
        txt2img.run(req, ctx)
    total = time.perf_counter() - t0
    steps = step_times(clock.times)
    label = "Easel --use-cpu all" + (" --compile" if "--compile" in flags else "") if row == "default" else label
    if ctx.warnings:
        print("  warnings: " + "; ".join(ctx.warnings), flush=True)
    result = {"label": label, "steps": req.steps, "run_rss_gib": rss.gib, "dtype": f"unet {policy.dtype}, vae {policy.vae_dtype}".replace("torch.", ""),
              "step": statistics.median(steps), "image": total, "load": load_s}
    del ctx, model
    gc.collect()
    return result


def run_diffusers(ckpt: Path, args) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from _models import diffusers_config_folder

    config = diffusers_config_folder("sd1", args.folder)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(config), torch_dtype=torch.float32,
                                                    safety_checker=None, requires_safety_checker=False,
                                                    local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    times: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        times.append(time.perf_counter())
        return kwargs

    t0 = time.perf_counter()
    times.append(t0)
    with torch.no_grad(), PeakRSS() as rss:
        pipe("a photograph of an astronaut riding a horse", negative_prompt="blurry", num_inference_steps=args.steps,
             height=args.size, width=args.size, guidance_scale=7, generator=torch.Generator().manual_seed(1),
             callback_on_step_end=on_step)
    total = time.perf_counter() - t0
    result = {"label": "diffusers float32", "dtype": "float32", "steps": args.steps, "run_rss_gib": rss.gib, "step": statistics.median(step_times(times)),
              "image": total, "load": load_s}
    del pipe
    gc.collect()
    return result


def main() -> None:
    args = parse()
    import psutil
    import torch

    from backend.engine.devices import cpu_bf16_supported, cpu_description, cpu_model_name

    threads = args.threads or psutil.cpu_count(logical=False) or os.cpu_count()
    torch.set_num_threads(threads)
    from _models import random_checkpoint
    ckpt = random_checkpoint("sd1", args.folder)
    print(f"CPU: {cpu_model_name()}, {cpu_description()}, bf16 hardware: {cpu_bf16_supported()}, threads: {threads}, "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"SD 1.5 architecture, random weights ({ckpt.name}), {args.size}x{args.size}, {args.steps} steps, "
          f"Euler, CFG 7, batch 1\n", flush=True)
    if args.row:
        import json
        import resource
        result = run_diffusers(ckpt, args) if args.row == "diffusers" else run_easel(ckpt, args, [], args.row)
        result["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print("ROW " + json.dumps(result), flush=True)
        return
    if args.table:
        print_table(args)
        return
    rows = [run_easel(ckpt, args, [])]
    print(f"  {rows[-1]['label']}: {rows[-1]['step']:.2f} s/step, {rows[-1]['image']:.1f} s/image", flush=True)
    if args.compile:
        rows.append(run_easel(ckpt, args, ["--compile"]))
        print(f"  {rows[-1]['label']}: {rows[-1]['step']:.2f} s/step, {rows[-1]['image']:.1f} s/image", flush=True)
    if not args.skip_diffusers:
        rows.append(run_diffusers(ckpt, args))
        print(f"  {rows[-1]['label']}: {rows[-1]['step']:.2f} s/step, {rows[-1]['image']:.1f} s/image", flush=True)
    base = rows[-1] if not args.skip_diffusers else rows[0]
    print()
    print(f"| path | dtypes | s/step | s/image ({args.steps} steps) | load s | image time vs diffusers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['dtype']} | {r['step']:.2f} | {r['image']:.1f} | {r['load']:.1f} | "
              f"{r['image'] / base['image']:.2f}x time ({base['image'] / r['image']:.2f}x speed) |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


def print_table(args) -> None:
    """Every row of ROWS in its own process (its own peak RSS); the table with seconds per image vs diffusers."""
    import json
    import subprocess
    rows = []
    for row in ROWS:
        if row == "diffusers" and args.skip_diffusers:
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--steps", str(args.steps),
               "--size", str(args.size), "--folder", str(args.folder), "--cpu-bf16", args.cpu_bf16]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode != 0 or not found:
            print(f"  {row}: failed\n{out.stdout[-2000:]}{out.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(found[-1]))
        r = rows[-1]
        print(f"  {r['label']}: {r['image']:.1f} s/image, {r['step']:.2f} s/step, peak RSS {r['run_rss_gib']:.2f} GiB "
              f"generating ({r['rss_gib']:.2f} GiB with loading)", flush=True)
    base = next((r for r in rows if r["label"].startswith("diffusers")), rows[0] if rows else None)
    if base is None:
        return
    print()
    print("| path | steps | dtypes | s/step | s/image | peak RSS GiB generating (with loading) | "
          "speed vs diffusers float32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['steps']} | {r['dtype']} | {r['step']:.2f} | {r['image']:.1f} | "
              f"{r['run_rss_gib']:.2f} ({r['rss_gib']:.2f}) | {base['image'] / r['image']:.2f}x |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
