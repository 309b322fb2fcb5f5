"""Is torch.compile worth it on this CPU? The SD 1.5 UNet (full size, random weights) in float32: eager PyTorch vs
`torch.compile` (inductor) with and without weight freezing (`torch._inductor.config.freezing`: the weights become
constants, so oneDNN can pack them ahead), batch 2 (CFG), timed in alternation so that other load on the machine
falls on every path alike.

Issue 16 asks for 1.3x over diffusers float32 on AVX2-only CPUs; this measures the compiler paths (each compiles once
per image size; frozen weights are folded into the compiled code, so a LoRA change would need a new compile).

    venv/bin/python benchmarks/bench_inductor.py [--rounds 3] [--threads N] [--size 512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    args = p.parse_args()
    import psutil
    import torch
    from diffusers import UNet2DConditionModel

    from _models import _randomize, full_configs
    from backend.engine.devices.cpu import cpu_description, cpu_model_name

    threads = args.threads or psutil.cpu_count(logical=False) or 1
    torch.set_num_threads(threads)
    print(f"CPU: {cpu_model_name()}, {cpu_description()}; {threads} threads; torch {torch.__version__}")

    def build() -> torch.nn.Module:
        unet = UNet2DConditionModel(**full_configs("sd1")["unet"])
        _randomize(unet, torch.Generator().manual_seed(0))
        return unet.eval()

    side = args.size // 8
    gen = torch.Generator().manual_seed(1)
    x, t, c = torch.randn(2, 4, side, side, generator=gen), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=gen)
    paths: dict[str, torch.nn.Module] = {"eager": build()}
    paths["inductor"] = torch.compile(build())
    # its own inductor options: a compile of its own (the other's compiled code would fit these modules too)
    paths["inductor, frozen weights"] = torch.compile(build(), options={"freezing": True})
    outputs = {}
    with torch.inference_mode():
        for name, module in paths.items():
            start = time.perf_counter()
            outputs[name] = module(x, t, c).sample
            print(f"{name}: first call (compile) {time.perf_counter() - start:.1f} s; largest difference from eager "
                  f"{(outputs[name] - outputs['eager']).abs().max().item():.2e}", flush=True)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(args.rounds):
            for name, module in paths.items():
                start = time.perf_counter()
                module(x, t, c)
                times[name].append(time.perf_counter() - start)
            print(f"round {i + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()), flush=True)
    eager = min(times["eager"])
    print()
    print(f"| UNet forward, batch 2, {args.size}x{args.size}, float32 | best s | speed |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {min(values):.2f} | {eager / min(values):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
