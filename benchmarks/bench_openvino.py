"""Is OpenVINO worth it on this CPU? The SD 1.5 UNet (full size, random weights) in float32: PyTorch's forward vs the
same module converted by OpenVINO (`openvino.convert_model`, CPU plugin, float32 inference precision), batch 2
(CFG) at 512x512, timed in alternation so that other load on the machine falls on both alike.

Issue 16 asks for 1.3x over diffusers float32 on AVX2-only CPUs and names OpenVINO as a candidate; this measures it
before Easel grows an OpenVINO path (a conversion per image size and per LoRA change, see the README's figures).

    pip install openvino      # not one of Easel's requirements: this benchmark only
    venv/bin/python benchmarks/bench_openvino.py [--rounds 5] [--threads N] [--size 512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    args = p.parse_args()
    try:
        import openvino as ov
    except ImportError:
        print("openvino is not installed: `venv/bin/python -m pip install openvino` (this benchmark only).")
        return 0
    import psutil
    import torch
    from diffusers import UNet2DConditionModel

    from backend.engine.devices.cpu import cpu_description, cpu_model_name

    threads = args.threads or psutil.cpu_count(logical=False) or 1
    torch.set_num_threads(threads)
    print(f"CPU: {cpu_model_name()}, {cpu_description()}; {threads} threads; torch {torch.__version__}, "
          f"openvino {ov.__version__}")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD 1.5's UNet
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    side = args.size // 8
    x, t, c = torch.randn(2, 4, side, side), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)

    class Forward(torch.nn.Module):  # positional in, tensor out: what convert_model traces
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, c):
            return self.inner(x, t, c, return_dict=False)[0]

    with torch.inference_mode():
        reference = unet(x, t, c).sample
    start = time.perf_counter()
    converted = ov.convert_model(Forward(unet), example_input=(x, t, c))
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                          "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "f32"})
    compile_s = time.perf_counter() - start
    request = compiled.create_infer_request()
    inputs = [x.numpy(), t.numpy(), c.numpy()]
    out = torch.from_numpy(request.infer(inputs)[0].copy())
    print(f"conversion {convert_s:.1f} s, compilation {compile_s:.1f} s; largest difference from PyTorch "
          f"{(out - reference).abs().max().item():.2e} (outputs up to {reference.abs().max().item():.2f})")
    rows = []
    for i in range(args.rounds):
        with torch.inference_mode():
            start = time.perf_counter()
            unet(x, t, c)
            torch_s = time.perf_counter() - start
        start = time.perf_counter()
        request.infer(inputs)
        ov_s = time.perf_counter() - start
        rows.append((torch_s, ov_s))
        print(f"round {i + 1}: PyTorch {torch_s:.2f} s, OpenVINO {ov_s:.2f} s, {torch_s / ov_s:.2f}x")
    best_torch, best_ov = min(r[0] for r in rows), min(r[1] for r in rows)
    print()
    print(f"| UNet forward, batch 2, {args.size}x{args.size}, float32 | best s | speed |")
    print("| --- | --- | --- |")
    print(f"| PyTorch {torch.__version__} | {best_torch:.2f} | 1.00x |")
    print(f"| OpenVINO {ov.__version__.split('-')[0]} | {best_ov:.2f} | {best_torch / best_ov:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
