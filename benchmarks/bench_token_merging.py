"""Token merging benchmark: UNet steps per second with token_merging_ratio 0 and 0.5 (and any other ratios given).

    venv/bin/python benchmarks/bench_token_merging.py                  # SD 1.5 UNet, 512x512, 4 steps per ratio
    venv/bin/python benchmarks/bench_token_merging.py --size 256       # a quicker check
    venv/bin/python benchmarks/bench_token_merging.py --device cuda    # on a GPU (float16)

The UNet is SD 1.5's published architecture (`_models.full_configs("sd1")`) with seeded random weights, built in
memory (no file). One step = one UNet call on a CFG batch of 2 latents (what a sampler step with CFG costs),
run under `backend.engine.token_merging.token_merging(unet, ratio)` as the pipelines run each pass. After one
warm-up call per ratio, the median of the timed calls gives it/s. Other load on the machine moves the numbers;
the ratio between the rows is the figure to read.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--size", type=int, default=512, help="picture size in pixels (latent = size / 8)")
    p.add_argument("--steps", type=int, default=4, help="timed UNet calls per ratio")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def main() -> None:
    args = parse()
    import psutil
    import torch
    from diffusers import UNet2DConditionModel

    from _models import _randomize, full_configs
    from backend.engine.devices import cpu_description
    from backend.engine.token_merging import token_merging

    threads = args.threads or psutil.cpu_count(logical=False) or os.cpu_count()
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"CPU: {cpu_description()}, threads: {threads}, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    config = full_configs("sd1")["unet"]
    unet = UNet2DConditionModel(**config)
    _randomize(unet, torch.Generator().manual_seed(0))
    unet = (unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)).eval()
    latent = args.size // 8
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, latent, latent, generator=generator).to(device, dtype)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=generator).to(device, dtype)
    timestep = torch.tensor([500.0, 500.0], device=device, dtype=dtype)
    print(f"SD 1.5 UNet, random weights, {args.size}x{args.size} (latent {latent}x{latent}), CFG batch 2, "
          f"{dtype}, {args.steps} timed steps per ratio\n", flush=True)

    def one_step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        unet(sample, timestep, encoder_hidden_states=context)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    rows = []
    with torch.no_grad():
        for ratio in args.ratios:
            with token_merging(unet, ratio) as hooked:
                one_step()  # warm-up
                times = [one_step() for _ in range(args.steps)]
            step = statistics.median(times)
            rows.append((ratio, hooked, step))
            print(f"  token_merging_ratio {ratio:g}: {1 / step:.3f} it/s ({step:.2f} s/step, "
                  f"{hooked} transformer blocks hooked; those at the latent size merge)", flush=True)
    base = rows[0][2]
    print()
    print("| token_merging_ratio | it/s | s/step | speed vs first row |")
    print("| --- | --- | --- | --- |")
    for ratio, _hooked, step in rows:
        print(f"| {ratio:g} | {1 / step:.3f} | {step:.2f} | {base / step:.2f}x |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
