"""FLUX.1 benchmark: s/step and peak memory of FLUX.1-dev in bf16/float8/GGUF (random weights), and SD 3.5 Medium.

The FLUX.1-dev transformer at full width with random weights stored as bf16, float8_e4m3fn, GGUF Q8_0, Q4_0 and
Q4_K, timed over two or three steps at 512x512, and SD 3.5 Medium's transformer in bf16.

    venv/bin/python benchmarks/bench_flux.py --quick              # 1 double + 2 single blocks, extrapolated (minutes)
    venv/bin/python benchmarks/bench_flux.py --blocks 2,4         # any depth at full width, extrapolated to 19 + 38
    venv/bin/python benchmarks/bench_flux.py                      # the whole model (bf16 needs ~24 GiB of RAM)
    venv/bin/python benchmarks/bench_flux.py --device cuda        # on a GPU: peak VRAM instead of RSS
    venv/bin/python benchmarks/bench_flux.py --formats Q4_0,Q4_K --skip-sd3 --steps 3

The transformer is FLUX.1-dev's architecture (width 3072 = 24 heads x 128, 19 double-stream + 38 single-stream
blocks, T5 context 4096, pooled CLIP 768, distilled-guidance input; ~11.9 G parameters). Its tensors are made
in Black Forest Labs' layout, as the distributed files hold them, with seeded random values in each storage
format (float8: N(0, 1/fan_in) cast to float8_e4m3fn; GGUF: random valid blocks, scales set so the weights have
that same spread; 1-D tensors in bf16), and loaded through Easel's own `load_flux_transformer` (so float8 and
GGUF weights stay quantized in `QuantizedLinear`s and are dequantized in each forward, as when serving). Nothing
is written to disk. `--blocks D,S` builds D double and S single blocks at full width; the time of the whole
model is then the measured step minus the blocks' own time plus 19 x the mean double-block time and 38 x the
mean single-block time (each block is timed by forward hooks), and its weights likewise (the blocks are
identical in size). Those columns say "extrapolated".

Each format runs in a fresh process, so its peak resident memory (or peak VRAM, `--device cuda`) is its own.
A step is one transformer forward under `torch.inference_mode` in bfloat16: 1024 image tokens (64x64 latent in
2x2 patches), 512 T5 tokens, batch 1 (real CFG 1, as FLUX dev is run). The first step warms up; with 2 or
more steps the fastest of the later ones is given (the least slowed by other load on the machine). The SD 3.5
Medium row is its real architecture (24 joint blocks, width 1536, dual attention in the first 13, ~2.5 G
parameters) in bf16, 1024 image + 333 text tokens (77 CLIP + 256 T5), built at full depth unless
`--sd3-layers` says otherwise.

A first, smaller table times what the quantized formats add to every forward, apart from other load: turning
one 12288x3072 weight (an MLP projection; the whole model has the equivalent of ~316 of them) into bf16, the
fastest of a few repetitions, beside a bf16 matmul of that weight with the 1536 tokens of a 512x512 step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMATS = ("bf16", "float8_e4m3fn", "Q8_0", "Q4_0", "Q4_K")
DEFAULT_FORMATS = "bf16,float8_e4m3fn,Q8_0,Q4_0,Q4_K"
FLUX_DEV = {"inner": 3072, "head_dim": 128, "mlp": 4 * 3072, "double": 19, "single": 38, "in_channels": 64,
            "context": 4096, "pooled": 768, "time": 256}
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
               "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
               "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
GIB = 2 ** 30


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"comma-separated, among {', '.join(FORMATS)} (default {DEFAULT_FORMATS})")
    p.add_argument("--blocks", default=None,
                   help="D,S: build D double and S single blocks at full width and extrapolate (default 19,38)")
    p.add_argument("--steps", type=int, default=2, help="transformer forwards per format (the first warms up)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--text-tokens", type=int, default=512, help="T5 tokens of the FLUX context (dev: 512)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, the physical cores)")
    p.add_argument("--sd3-layers", type=int, default=None, help="SD 3.5 Medium depth built (default 24, the real one)")
    p.add_argument("--skip-sd3", action="store_true", help="leave out the SD 3.5 Medium row")
    p.add_argument("--skip-dequant", action="store_true", help="leave out the dequantization table")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on a small CPU: --blocks 1,2 and SD 3.5 Medium at 2 layers, extrapolated")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one format, run in a fresh process
    args = p.parse_args(argv)
    if args.quick:
        args.blocks = args.blocks or "1,2"
        args.sd3_layers = args.sd3_layers or 2
    try:
        d, s = (int(x) for x in (args.blocks or f"{FLUX_DEV['double']},{FLUX_DEV['single']}").split(","))
    except ValueError:
        p.error("--blocks takes two numbers, D,S (e.g. 1,2)")
    if d < 1 or s < 1 or d > FLUX_DEV["double"] or s > FLUX_DEV["single"]:
        p.error(f"--blocks needs 1-{FLUX_DEV['double']} double and 1-{FLUX_DEV['single']} single blocks")
    args.double, args.single = d, s
    args.sd3_layers = args.sd3_layers or SD35_MEDIUM["num_layers"]
    if not 1 <= args.sd3_layers <= SD35_MEDIUM["num_layers"]:
        p.error(f"--sd3-layers takes 1-{SD35_MEDIUM['num_layers']}")
    args.format_list = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.format_list if f not in FORMATS]
    if unknown:
        p.error(f"unknown format {unknown[0]!r}: choose among {', '.join(FORMATS)}")
    if args.size % 16:
        p.error("--size must be a multiple of 16 (8x VAE, 2x2 patches)")
    return args


# -- the machine -------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def machine_line(device: str) -> str:
    import torch

    from backend.engine.devices import cpu_bf16_supported, cpu_description
    from backend.engine.devices.cpu import cpu_flags
    flags = cpu_flags()
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted) if flags else "flags not readable"
    line = (f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), {cpu_description()}; {have}; "
            f"bf16 hardware: {cpu_bf16_supported()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"load average {os.getloadavg()[0]:.1f}")
    if device.startswith("cuda") and torch.cuda.is_available():
        line += f"\nGPU: {torch.cuda.get_device_name(torch.device(device))}"
    return line


# -- random weights in the stored formats -----------------------------------------------------------
def flux_bfl_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.1-dev transformer in BFL's layout, with `double` / `single` blocks."""
    f = FLUX_DEV
    inner, mlp, head = f["inner"], f["mlp"], f["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"] = (out, inp)
        shapes[f"{name}.bias"] = (out,)

    linear("img_in", inner, f["in_channels"])
    linear("txt_in", inner, f["context"])
    for embed, width in (("time_in", f["time"]), ("vector_in", f["pooled"]), ("guidance_in", f["time"])):
        linear(f"{embed}.in_layer", inner, width)
        linear(f"{embed}.out_layer", inner, inner)
    for i in range(double):
        b = f"double_blocks.{i}."
        for stream in ("img", "txt"):
            linear(b + f"{stream}_mod.lin", 6 * inner, inner)
            linear(b + f"{stream}_attn.qkv", 3 * inner, inner)
            linear(b + f"{stream}_attn.proj", inner, inner)
            linear(b + f"{stream}_mlp.0", mlp, inner)
            linear(b + f"{stream}_mlp.2", inner, mlp)
            shapes[b + f"{stream}_attn.norm.query_norm.scale"] = (head,)
            shapes[b + f"{stream}_attn.norm.key_norm.scale"] = (head,)
    for i in range(single):
        b = f"single_blocks.{i}."
        linear(b + "linear1", 3 * inner + mlp, inner)
        linear(b + "linear2", inner, inner + mlp)
        linear(b + "modulation.lin", 3 * inner, inner)
        shapes[b + "norm.query_norm.scale"] = (head,)
        shapes[b + "norm.key_norm.scale"] = (head,)
    linear("final_layer.linear", f["in_channels"], inner)
    linear("final_layer.adaLN_modulation.1", 2 * inner, inner)
    return shapes


# GGUF block layouts (ggml): bytes of the f16 scale(s) inside a block, and the spread of the integer part
_GGUF_SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2)}
_GGUF_SPREAD = {"Q8_0": 73.9, "Q4_0": 4.61, "Q4_K": 31.5 * 4.61}  # std of the stored integer (times sub-scale)


def random_gguf(shape: tuple[int, int], fmt: str, generator, device):
    """A `GGUFWeight` of random but valid `fmt` blocks whose values spread about N(0, 1/fan_in)."""
    import gguf
    import torch

    from backend.engine.families.quantized import GGUFWeight
    qtype = gguf.GGMLQuantizationType[fmt]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = torch.randint(0, 256, (rows * cols // block_size, type_size), dtype=torch.uint8, generator=generator,
                           device=device)
    scale = 1.0 / (_GGUF_SPREAD[fmt] * math.sqrt(cols))
    for offset in _GGUF_SCALES[fmt]:
        d = torch.empty(blocks.shape[0], dtype=torch.float32, device=device).uniform_(0.8 * scale, 1.2 * scale,
                                                                                      generator=generator)
        blocks[:, offset:offset + 2] = d.to(torch.float16).view(torch.uint8).reshape(-1, 2)
    return GGUFWeight(blocks.reshape(rows, -1), qtype, shape)


def random_tensor(name: str, shape: tuple[int, ...], fmt: str, generator, device):
    """One tensor of the file: 2-D weights in `fmt`, 1-D tensors (biases, norm scales) in bf16."""
    import torch
    if len(shape) == 1:
        if name.endswith(".scale"):
            return 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
        return 0.02 * torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    if fmt.startswith("Q"):
        import gguf
        block_size, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
        if shape[1] % block_size == 0:
            return random_gguf(shape, fmt, generator, device)
        fmt = "bf16"  # rows that are not whole blocks stay unquantized (F16 in city96's files)
    w = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16) / math.sqrt(shape[1])
    return w.to(torch.float8_e4m3fn) if fmt == "float8_e4m3fn" else w


def random_flux(fmt: str, double: int, single: int, device, seed: int = 0):
    """The FLUX.1-dev transformer (`double` / `single` blocks) with random `fmt` weights, loaded by Easel."""
    import torch

    from backend.engine.families.flux import load_flux_transformer
    generator = torch.Generator(device=device).manual_seed(seed)
    sd = {name: random_tensor(name, shape, fmt, generator, device)
          for name, shape in flux_bfl_shapes(double, single).items()}
    model = load_flux_transformer(sd, dtype=torch.bfloat16, device=device)
    del sd
    return model


def random_sd35_medium(layers: int, device, seed: int = 0):
    """SD 3.5 Medium's transformer (`layers` joint blocks, dual attention in as many of them as the real one has
    in that share) with random bf16 weights, assigned by Easel's `load_weights`."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from backend.engine.model_loader import load_weights
    config = dict(SD35_MEDIUM, num_layers=layers)
    full_dual = len(SD35_MEDIUM["dual_attention_layers"])
    dual = full_dual if layers == SD35_MEDIUM["num_layers"] else max(1, round(layers * full_dual / 24))
    config["dual_attention_layers"] = tuple(range(min(dual, layers)))
    with init_empty_weights(include_buffers=True):
        model = SD3Transformer2DModel(**config)
    generator = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():  # N(0, 1/fan_in) matrices, norm scales near 1, small biases
        if t.ndim >= 2:
            sd[name] = torch.randn(t.shape, generator=generator, device=device, dtype=torch.bfloat16) \
                / math.sqrt(t[0].numel())
        else:
            sd[name] = random_tensor(name[:-len(".weight")] + ".scale" if "norm" in name and name.endswith(".weight")
                                     else name, tuple(t.shape), "bf16", generator, device)
    load_weights(model, sd, "SD 3.5 Medium transformer", dtype=torch.bfloat16, device=device)
    return model.eval().requires_grad_(False), config


# -- timing ------------------------------------------------------------------------------------------
class BlockClock:
    """Wall time of each call of the given blocks (forward pre/post hooks), per kind."""

    def __init__(self, blocks: dict[str, list], sync):
        self.sync = sync
        self.times: dict[str, list[float]] = {kind: [] for kind in blocks}
        self._start = 0.0
        self._handles = []
        for kind, modules in blocks.items():
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post(kind)))

    def _pre(self, _module, _args):
        self.sync()
        self._start = time.perf_counter()

    def _post(self, kind):
        def hook(_module, _args, _out):
            self.sync()
            self.times[kind].append(time.perf_counter() - self._start)
        return hook

    def reset(self) -> None:
        for v in self.times.values():
            v.clear()


def time_steps(model, blocks: dict[str, list], call, steps: int, sync) -> dict:
    """Run `call(i)` `steps` times. The result is the fastest step after the first (the first warms up; the only
    one when `steps` is 1), the one least slowed by other load on the machine, with its per-kind block means."""
    import torch
    clock = BlockClock(blocks, sync)
    runs = []
    with torch.inference_mode():
        for i in range(steps):
            clock.reset()
            sync()
            t0 = time.perf_counter()
            out = call(i)
            sync()
            seconds = time.perf_counter() - t0
            if not torch.isfinite(out.float()).all():
                raise RuntimeError("the transformer gave non-finite values: the random weights are out of range")
            runs.append({"step": seconds, "blocks_total": sum(sum(v) for v in clock.times.values()),
                         "block": {k: sum(v) / len(v) for k, v in clock.times.items()}})
            print(f"    step {i + 1}/{steps}: {seconds:.2f} s", file=sys.stderr, flush=True)
    best = min(runs[1:] or runs, key=lambda r: r["step"])
    return dict(best, first_step=runs[0]["step"], steps=[r["step"] for r in runs])


def extrapolate(measured: dict, built: dict[str, int], full: dict[str, int]) -> float:
    """The step's time with `full` blocks of each kind instead of `built`: the parts outside the blocks as measured."""
    outside = measured["step"] - measured["blocks_total"]
    return outside + sum(measured["block"][k] * full[k] for k in full)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def block_bytes(modules) -> float:
    from backend.engine.families.quantized import stored_weight_bytes
    return sum(stored_weight_bytes(m) for m in modules) / len(modules)


# -- one format in this process ---------------------------------------------------------------------
def run_child(args) -> dict:
    import torch

    from backend.engine.families.quantized import stored_weight_bytes
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    latent = args.size // 8
    tokens = (latent // 2) ** 2
    g = torch.Generator(device=device).manual_seed(1)
    t0 = time.perf_counter()
    if args.child == "sd3.5-medium":
        model, config = random_sd35_medium(args.sd3_layers, device)
        dual = set(config["dual_attention_layers"])
        kinds = {"dual": [b for i, b in enumerate(model.transformer_blocks) if i in dual],
                 "joint": [b for i, b in enumerate(model.transformer_blocks) if i not in dual]}
        kinds = {k: v for k, v in kinds.items() if v}
        full = {"dual": len(SD35_MEDIUM["dual_attention_layers"]),
                "joint": SD35_MEDIUM["num_layers"] - len(SD35_MEDIUM["dual_attention_layers"])}
        text = 77 + 256
        x = torch.randn(1, 16, latent, latent, generator=g, device=device, dtype=torch.bfloat16)
        ctx = torch.randn(1, text, 4096, generator=g, device=device, dtype=torch.bfloat16)
        pooled = torch.randn(1, 2048, generator=g, device=device, dtype=torch.bfloat16)

        def call(i):
            sigma = 1.0 - i / max(args.steps, 1) * 0.5
            t = torch.full((1,), sigma * 1000, device=device, dtype=torch.bfloat16)
            return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                         return_dict=False)[0]
        built = {k: len(v) for k, v in kinds.items()}
        label_blocks = f"{args.sd3_layers} of 24 layers"
    else:
        model = random_flux(args.child, args.double, args.single, device)
        kinds = {"double": list(model.transformer_blocks), "single": list(model.single_transformer_blocks)}
        full = {"double": FLUX_DEV["double"], "single": FLUX_DEV["single"]}
        text = args.text_tokens
        x = torch.randn(1, tokens, FLUX_DEV["in_channels"], generator=g, device=device, dtype=torch.bfloat16)
        ctx = torch.randn(1, text, FLUX_DEV["context"], generator=g, device=device, dtype=torch.bfloat16)
        pooled = torch.randn(1, FLUX_DEV["pooled"], generator=g, device=device, dtype=torch.bfloat16)
        side = latent // 2
        img_ids = torch.zeros(side, side, 3, device=device)
        img_ids[..., 1] = torch.arange(side, device=device)[:, None]
        img_ids[..., 2] = torch.arange(side, device=device)[None, :]
        img_ids = img_ids.reshape(-1, 3)
        txt_ids = torch.zeros(text, 3, device=device)
        guidance = torch.full((1,), 3.5, device=device)

        def call(i):
            sigma = 1.0 - i / max(args.steps, 1) * 0.5
            t = torch.full((1,), sigma, device=device, dtype=torch.bfloat16)
            return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                         img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        built = {k: len(v) for k, v in kinds.items()}
        label_blocks = f"{args.double}+{args.single} of 19+38 blocks"
    build_s = time.perf_counter() - t0
    stored = stored_weight_bytes(model)
    blocks_stored = {k: block_bytes(v) for k, v in kinds.items()}
    stored_full = stored + sum(blocks_stored[k] * (full[k] - built[k]) for k in full if k in kinds)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    print(f"  {args.child}: built {label_blocks} in {build_s:.0f} s, {stored / GIB:.2f} GiB of weights",
          file=sys.stderr, flush=True)
    measured = time_steps(model, kinds, call, args.steps, sync)
    complete = all(built.get(k, 0) == full[k] for k in full)
    result = {"format": args.child, "blocks": label_blocks, "complete": complete, "tokens": f"{tokens}+{text}",
              "stored_gib": stored / GIB, "stored_full_gib": stored_full / GIB, "step": measured["step"],
              "first_step": measured["first_step"], "steps": measured["steps"], "block": measured["block"],
              "build_s": build_s,
              "step_full": measured["step"] if complete else extrapolate(measured, built, {
                  k: full[k] for k in full if k in kinds}),
              "peak_rss_gib": peak_rss_gib()}
    if not complete and set(kinds) != set(full):
        result["note"] = "a block kind was not built: its time is not in the extrapolation"
    if cuda:
        result["peak_vram_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return result


# -- the table ---------------------------------------------------------------------------------------
def model_bytes(fmt: str, double: int = FLUX_DEV["double"], single: int = FLUX_DEV["single"]) -> float:
    """Stored weight bytes of a FLUX.1-dev transformer with `double` + `single` blocks in `fmt` (from the shapes)."""
    import gguf
    total = 0.0
    for shape in flux_bfl_shapes(double, single).values():
        n = math.prod(shape)
        if len(shape) == 1 or fmt == "bf16":
            total += 2 * n
        elif fmt == "float8_e4m3fn":
            total += n
        else:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
            total += n / block * size if shape[1] % block == 0 else 2 * n
    return total


def dequant_table(args) -> None:
    """Seconds to dequantize one 12288x3072 weight to bf16 per format, beside a bf16 matmul with it."""
    import torch

    from backend.engine.families.quantized import QuantizedLinear
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(2)
    shape = (FLUX_DEV["mlp"], FLUX_DEV["inner"])
    tokens = (args.size // 16) ** 2 + args.text_tokens
    x = torch.randn(tokens, shape[1], generator=generator, device=device, dtype=torch.bfloat16)

    def best(fn, repeat: int = 4) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)
    with torch.inference_mode():
        w = random_tensor("w", shape, "bf16", generator, device)
        matmul = best(lambda: torch.nn.functional.linear(x, w))
        print(f"| one {shape[0]}x{shape[1]} weight | bytes | dequantize to bf16, s | "
              f"vs the bf16 matmul ({tokens} tokens, {matmul:.3f} s) |")
        print("| --- | --- | --- | --- |")
        print(f"| bf16 | {w.numel() * 2 / 2**20:.0f} MiB | - | - |")
        for fmt in [f for f in FORMATS if f != "bf16"]:
            q = QuantizedLinear(random_tensor("w", shape, fmt, generator, device))
            seconds = best(lambda: q.dequantized_weight(torch.bfloat16))
            print(f"| {fmt} | {q.weight_bytes / 2**20:.0f} MiB | {seconds:.3f} | +{100 * seconds / matmul:.0f}% |")
    print(flush=True)


def spawn(fmt: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", fmt, "--blocks", f"{args.double},{args.single}",
           "--steps", str(args.steps), "--size", str(args.size), "--text-tokens", str(args.text_tokens),
           "--device", args.device, "--sd3-layers", str(args.sd3_layers)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        return {"format": fmt, "error": f"exit status {proc.returncode} (see above)"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse()
    import torch
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA GPU: nothing measured (run without --device cuda for the CPU)")
        return
    import psutil
    print(machine_line(args.device))
    latent = args.size // 8
    print(f"FLUX.1-dev architecture, random weights, {args.size}x{args.size} ({(latent // 2) ** 2} image tokens), "
          f"{args.text_tokens} T5 tokens, batch 1, bf16 compute, {args.steps} step(s) per format, "
          f"{args.double} double + {args.single} single blocks built"
          + (" (extrapolated to 19 + 38)" if (args.double, args.single) != (19, 38) else "") + "\n", flush=True)
    if not args.skip_dequant:
        dequant_table(args)
    rows = []
    jobs = list(args.format_list) + ([] if args.skip_sd3 else ["sd3.5-medium"])
    for fmt in jobs:
        if fmt != "sd3.5-medium" and not cuda:
            need = model_bytes(fmt, args.double, args.single) * 1.1 + 2 * GIB
            free = psutil.virtual_memory().available
            if need > free:
                print(f"  {fmt}: skipped, needs about {need / GIB:.1f} GiB, {free / GIB:.1f} GiB available "
                      "(use --blocks D,S)", flush=True)
                rows.append({"format": fmt, "error": f"skipped: needs ~{need / GIB:.0f} GiB of RAM"})
                continue
        rows.append(spawn(fmt, args))
        r = rows[-1]
        if "error" not in r:
            print(f"  {fmt}: {r['step']:.2f} s/step measured, {r['step_full']:.1f} s/step for the whole model, "
                  f"peak {'VRAM ' + format(r['peak_vram_gib'], '.2f') if cuda else 'RSS ' + format(r['peak_rss_gib'], '.2f')} GiB",
                  flush=True)
    memory = "peak VRAM GiB" if cuda else "peak RSS GiB"
    print()
    print(f"| model, weights | blocks built | stored weights GiB (built / whole model) | s/step measured | "
          f"s/step whole model | {memory} (built / whole model) | first step s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = "SD 3.5 Medium, bf16" if r["format"] == "sd3.5-medium" else f"FLUX.1-dev, {r['format']}"
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | |")
            continue
        whole = f"{r['step_full']:.1f}" + ("" if r["complete"] else " (extrapolated)") \
            + (f" ({r['note']})" if r.get("note") else "")
        mem = r["peak_vram_gib"] if cuda else r["peak_rss_gib"]
        # the whole model's peak: the same working memory beside the whole model's weights
        mem_whole = f"{mem:.2f}" if r["complete"] else \
            f"{mem - r['stored_gib'] + r['stored_full_gib']:.1f} (estimated)"
        print(f"| {name} | {r['blocks']} | {r['stored_gib']:.2f} / {r['stored_full_gib']:.2f} | {r['step']:.2f} | "
              f"{whole} | {mem:.2f} / {mem_whole} | {r['first_step']:.2f} |")
    per_block = ", ".join(f"{r['format']} " + " / ".join(f"{k} {v:.2f} s" for k, v in r["block"].items())
                          for r in rows if "error" not in r)
    print(f"\nper block: {per_block}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
