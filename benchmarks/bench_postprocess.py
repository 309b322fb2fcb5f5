"""Post-processing benchmark: x4 upscales with a full-size Real-ESRGAN model and one face restored with GFPGAN, on the CPU.

    venv/bin/python benchmarks/bench_postprocess.py                    # 512 and 1024 px x4, GFPGAN (tens of minutes)
    venv/bin/python benchmarks/bench_postprocess.py --sizes 128 --skip-face   # a quick check

The models are the real architectures with random weights, written once into --folder as the released
files are laid out: RealESRGAN_x4plus.pth (RRDBNet, 64 features, 23 blocks, `params_ema`) and
GFPGANv1.4.pth (GFPGANv1-clean, 512 px). They load through Easel's spandrel loader and run through the
same code as the Extras tab: the upscale in tiles (--tile, --overlap: the `ESRGAN_tile` settings, default
192/8), the face restore as detect (the offline OpenCV Haar detector) + align + GFPGAN + paste back on
scikit-image's astronaut photograph. Each case runs in a fresh process, so its peak memory is its own:
the table gives wall seconds, the process's peak resident memory, and how much that peak grew during
the run (the tiling keeps this near the size of the output image). Upscales run in float32, and also in
bfloat16 where the CPU has bf16 hardware (as the device policy would choose).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024", help="comma-separated input sizes (square), each upscaled x4")
    p.add_argument("--tile", type=int, default=192)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, the physical cores)")
    p.add_argument("--folder", type=Path, default=Path(os.environ.get("EASEL_BENCH_DIR", "/tmp/easel-bench")),
                   help="where the random-weight model files are written once and reused")
    p.add_argument("--skip-face", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="float32 only, even on CPUs with bf16 hardware")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_file(folder: Path, kind: str) -> Path:
    from postprocess_factory import write_gfpgan_v14, write_realesrgan_rrdb

    path = folder / ("RealESRGAN_x4plus.pth" if kind == "esrgan" else "GFPGANv1.4.pth")
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        (write_realesrgan_rrdb(part, num_feat=64, num_block=23) if kind == "esrgan" else write_gfpgan_v14(part))
        part.replace(path)
    return path


def run_case(args) -> dict:
    """One measurement in this (fresh) process."""
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    from backend.engine.postprocess.model_files import LoadedModel, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    kind, size, dtype_name = args.case.split(":")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    photo = Image.fromarray(skimage.data.astronaut())
    if kind == "upscale":
        from backend.engine.postprocess.upscalers import Upscaler, upscale

        path = model_file(args.folder, "esrgan")
        model = load_model(path, "upscaler").to(dtype)
        loaded = LoadedModel(model, path, "upscaler", torch.device("cpu"), dtype)
        if loaded.channels_last:
            model.model.to(memory_format=torch.channels_last)
        image = photo.resize((int(size), int(size)), Image.Resampling.LANCZOS)
        entry = Upscaler("R-ESRGAN 4x+", "model", "RealESRGAN", path, None, 4)
        upscale(image.crop((0, 0, 32, 32)), entry, 4, load=lambda _u: loaded, tile=args.tile)  # warm-up
        tiles = []
        before = peak_rss_mb()
        t0 = time.perf_counter()
        out = upscale(image, entry, 4, load=lambda _u: loaded, tile=args.tile, overlap=args.overlap,
                      on_tile=lambda: tiles.append(1))
        seconds = time.perf_counter() - t0
        assert out.size == (4 * int(size), 4 * int(size))
        return {"case": f"x4 upscale {size}x{size} -> {out.width}x{out.height}", "model": "RealESRGAN_x4plus (RRDBNet 64nf 23nb)",
                "dtype": dtype_name, "tiles": len(tiles), "seconds": seconds, "peak_mb": peak_rss_mb(),
                "grew_mb": peak_rss_mb() - before}
    from backend.engine.postprocess.face_detection import HaarCascadeDetector
    from backend.engine.postprocess.face_restore import restore_faces

    path = model_file(args.folder, "gfpgan")
    loaded = LoadedModel(load_model(path, "gfpgan"), path, "gfpgan", torch.device("cpu"), torch.float32)
    detector = HaarCascadeDetector()
    before = peak_rss_mb()
    t0 = time.perf_counter()
    faces = detector.detect(np.asarray(photo))
    detect_s = time.perf_counter() - t0
    outcome = restore_faces(photo, loaded, detector)
    seconds = time.perf_counter() - t0
    assert outcome.faces == 1
    return {"case": "face restore, 1 face in 512x512", "model": "GFPGANv1.4 (GFPGANv1-clean 512)", "dtype": "float32",
            "tiles": f"{len(faces)} face", "seconds": seconds, "detect_s": detect_s, "peak_mb": peak_rss_mb(),
            "grew_mb": peak_rss_mb() - before}


def main() -> None:
    args = parse()
    if args.case:
        print(json.dumps(run_case(args)), flush=True)
        return
    import torch

    from backend.engine.devices import cpu_bf16_supported, cpu_description

    dtypes = ["float32"] + (["bfloat16"] if cpu_bf16_supported() and not args.no_bf16 else [])
    cases = [f"upscale:{int(s)}:{d}" for s in args.sizes.split(",") if s.strip() for d in dtypes]
    if not args.skip_face:
        cases.insert(len(dtypes), "face:512:float32")  # after the first size: the quick one before the long ones
    print(f"CPU {cpu_description()}, {torch.get_num_threads() if not args.threads else args.threads} threads; "
          f"tile {args.tile}, overlap {args.overlap}; models in {args.folder}", flush=True)
    for kind in ("esrgan", "gfpgan"):
        if kind == "esrgan" or not args.skip_face:
            model_file(args.folder, kind)
    rows = []
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--folder", str(args.folder)] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{case}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {row['case']} ({row['dtype']}): {row['seconds']:.1f} s, peak {row['peak_mb']:.0f} MB, "
              f"grew {row['grew_mb']:.0f} MB", flush=True)
    print()
    print("| case | model | dtype | tiles | seconds | peak RSS (MB) | grew during run (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        extra = f" (detect {r['detect_s']:.2f} s)" if "detect_s" in r else ""
        print(f"| {r['case']} | {r['model']} | {r['dtype']} | {r['tiles']} | {r['seconds']:.1f}{extra} | "
              f"{r['peak_mb']:.0f} | {r['grew_mb']:.0f} |")


if __name__ == "__main__":
    main()
