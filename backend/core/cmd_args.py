"""Command-line flags, parsed in one place, named as AUTOMATIC1111 names them.

`launch.py` and `app.py` both call `parse_args`; nothing else reads sys.argv.
"""
from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding app.py (backend/core/ is two below it)

USE_CPU_CHOICES = ("all", "sd", "interrogate", "gfpgan", "esrgan", "codeformer")


# app.py's exit code after /sdapi/v1/server-restart (--api-server-stop) where it cannot re-execute itself in place
# (not POSIX): launch.py, which runs it as a child there, starts it again.
RESTART_EXIT_CODE = 3


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def backend_workers(args: argparse.Namespace) -> int:
    """How many backend workers: --backend-workers, else one per --device-id entry, else one per visible NVIDIA GPU
    (the model on the GPU: not with `--use-cpu all|sd`, nor on a Ray cluster, whose GPUs Ray counts), else one."""
    if getattr(args, "backend_workers", None):
        return int(args.backend_workers)
    ids = [part for part in str(getattr(args, "device_id", "") or "").split(",") if part.strip()]
    if ids:
        return len(ids)
    if getattr(args, "ray_address", None) or {"all", "sd"} & set(getattr(args, "use_cpu", None) or []):
        return 1
    return max(1, visible_gpu_count())


def visible_gpu_count() -> int:
    """The NVIDIA GPUs this process may use, found without importing torch (the app process never does):
    CUDA_VISIBLE_DEVICES when it is set, else the GPUs `nvidia-smi -L` lists; 0 where there is neither."""
    import os
    import shutil
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [part.strip() for part in visible.split(",") if part.strip()]
        # CUDA stops at the first invalid entry ("-1" hides every GPU)
        count = 0
        for entry in entries:
            if entry.startswith("-"):
                break
            count += 1
        return count
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Easel: a Stable Diffusion web UI in the style of AUTOMATIC1111.",
    )
    net = p.add_argument_group("network and security")
    net.add_argument("--listen", action="store_true", help="bind to 0.0.0.0 so other machines on the LAN can connect")
    net.add_argument("--server-name", default=None, help="host name or address to bind to (overrides --listen)")
    net.add_argument("--port", type=int, default=None, help="port to serve on (default 7860; 7861 with --nowebui)")
    net.add_argument("--share", action="store_true", help="create a public Gradio share link")
    net.add_argument("--api", action="store_true", help="enable the AUTOMATIC1111-compatible HTTP API under /sdapi/v1")
    net.add_argument("--nowebui", action="store_true", help="serve only the API, no web UI")
    net.add_argument("--api-log", action="store_true", help="log every API request")
    net.add_argument("--api-server-stop", action="store_true",
                     help="enable POST /sdapi/v1/server-kill, /server-restart and /server-stop (as AUTOMATIC1111)")
    net.add_argument("--gradio-auth", default=None, help='web UI logins, "user:pass[,user2:pass2]"')
    net.add_argument("--gradio-auth-path", default=None, help="file with web UI logins, one user:pass per line or comma separated")
    net.add_argument("--api-auth", default=None, help='API logins (HTTP Basic), "user:pass[,user2:pass2]"')
    net.add_argument("--allowed-hosts", default=None,
                     help="comma-separated host names the server answers to besides this machine's names and IP "
                          "addresses (protects against DNS rebinding); '.example.org' includes its subdomains, '*' any")
    net.add_argument("--cors-allow-origins", default=None, help="comma-separated origins allowed by CORS")
    net.add_argument("--cors-allow-origins-regex", default=None, help="regex of origins allowed by CORS")
    net.add_argument("--tls-keyfile", default=None)
    net.add_argument("--tls-certfile", default=None)
    net.add_argument("--subpath", default=None, help="serve under this URL path prefix")
    net.add_argument("--autolaunch", action="store_true", help="open the UI in the system browser at start")
    net.add_argument("--freeze-settings", action="store_true", help="refuse changes to settings from the UI and API")
    net.add_argument("--hide-ui-dir-config", action="store_true",
                     help="refuse folder paths from the UI and API (img2img batch folders, output folder settings)")
    net.add_argument("--enable-insecure-extension-access", action="store_true",
                     help="allow extension management even with --listen/--share")

    paths = p.add_argument_group("paths")
    paths.add_argument("--data-dir", default=str(REPO_ROOT), help="base folder for models/, outputs/, embeddings/, config.json")
    paths.add_argument("--models-dir", default=None, help="folder holding the model folders (default DATA_DIR/models)")
    paths.add_argument("--ckpt", default=None, help="checkpoint to load at start (a path or a file name)")
    paths.add_argument("--ckpt-dir", default=None, help="extra folder with Stable Diffusion checkpoints")
    paths.add_argument("--vae-dir", default=None, help="extra folder with VAE files")
    paths.add_argument("--text-encoder-dir", default=None, help="extra folder with text encoders (CLIP-L, CLIP-G, "
                       "T5-XXL) for FLUX.1 and SD3, listed in 'VAE / Text Encoder' (Forge's flag)")
    paths.add_argument("--vae-path", default=None, help="VAE file to use instead of the checkpoint's own")
    paths.add_argument("--embeddings-dir", default=None)
    paths.add_argument("--lora-dir", default=None)
    paths.add_argument("--hypernetwork-dir", default=None, help="extra folder with hypernetworks (besides models/hypernetworks)")
    paths.add_argument("--controlnet-dir", default=None)
    paths.add_argument("--gfpgan-models-path", default=None)
    paths.add_argument("--codeformer-models-path", default=None)
    paths.add_argument("--esrgan-models-path", default=None)
    paths.add_argument("--realesrgan-models-path", default=None)
    paths.add_argument("--styles-file", action="append", default=[],
                       help="a styles file or a glob of them; may be given several times (default DATA_DIR/styles.csv)")
    paths.add_argument("--ui-settings-file", default=None, help="settings file (default DATA_DIR/config.json)")
    paths.add_argument("--ui-config-file", default=None,
                       help="defaults, minimum, maximum and step of the UI's controls (default DATA_DIR/ui-config.json)")

    mem = p.add_argument_group("device, memory and precision")
    mem.add_argument("--use-cpu", nargs="+", default=[], choices=USE_CPU_CHOICES, metavar="{all,sd,interrogate,gfpgan,esrgan,codeformer}",
                     help="run these parts on the CPU")
    mem.add_argument("--medvram", action="store_true",
                     help="keep only one of text encoder / UNet / VAE (/ ControlNet) on the GPU at a time "
                          "(default: automatic, everything resident when it fits, partial loading when not)")
    mem.add_argument("--medvram-sdxl", action="store_true", help="--medvram for SDXL checkpoints only")
    mem.add_argument("--lowvram", action="store_true",
                     help="stream the UNet to the GPU in small units, copying the next while the current one computes")
    mem.add_argument("--lowram", action="store_true", help="load checkpoint weights straight to the GPU")
    mem.add_argument("--no-half", action="store_true", help="run the models in float32")
    mem.add_argument("--no-half-vae", action="store_true", help="run the VAE in float32")
    mem.add_argument("--precision", choices=("full", "half", "autocast"), default="autocast")
    mem.add_argument("--upcast-sampling", action="store_true")
    mem.add_argument("--opt-channelslast", action="store_true", help="channels-last memory format for the UNet and VAE")
    mem.add_argument("--disable-nan-check", action="store_true", help="do not check the VAE output for NaN")
    mem.add_argument("--device-id", default=None,
                     help="CUDA device index to use, or a list of them (0,1): one per backend worker, in turn")
    mem.add_argument("--backend-workers", type=_positive_int, default=None, metavar="N",
                     help="backend worker processes behind the one job queue, each owning one device (default: one per "
                          "--device-id entry, else one per visible NVIDIA GPU, worker i on GPU i; one with --use-cpu "
                          "all/sd or no GPU; on the CPU the physical cores are split between them)")
    mem.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="run the backend workers as Ray actors on the cluster at ADDR ('auto' or HOST:PORT), "
                          "--backend-workers of them (needs the ray package)")
    mem.add_argument("--xformers", action="store_true", help="xformers attention when the package is installed")
    mem.add_argument("--force-enable-xformers", action="store_true", help="same as --xformers")
    mem.add_argument("--opt-sdp-attention", action="store_true", help="PyTorch SDPA attention (the default)")
    mem.add_argument("--opt-sdp-no-mem-attention", action="store_true",
                     help="PyTorch SDPA without the memory-efficient kernel (deterministic)")
    mem.add_argument("--opt-split-attention", action="store_true", help="sliced attention (least memory)")
    mem.add_argument("--opt-sub-quad-attention", action="store_true", help="accepted; sliced attention as well")
    mem.add_argument("--disable-opt-split-attention", action="store_true", help="plain attention, no optimization")
    mem.add_argument("--compile", action="store_true",
                     help="torch.compile the UNet (CUDA graphs on the GPU), compiled once per image size")

    launch = p.add_argument_group("launcher")
    launch.add_argument("--skip-install", action="store_true", help="do not create the virtual environment or install requirements")
    launch.add_argument("--skip-prepare-environment", action="store_true", help="same as --skip-install")
    launch.add_argument("--skip-torch-cuda-test", action="store_true")
    launch.add_argument("--skip-version-check", action="store_true")
    launch.add_argument("--reinstall-torch", action="store_true")
    launch.add_argument("--no-download-sd-model", action="store_true", help="never offer to download a default checkpoint")
    launch.add_argument("--do-not-download-clip", action="store_true")
    launch.add_argument("--skip-load-model-at-start", action="store_true")
    launch.add_argument("--theme", choices=("light", "dark"), default=None,
                        help="the web UI's colour scheme (default: the browser's preference)")
    launch.add_argument("--loglevel", default="INFO")
    launch.add_argument("--run-tests", action="store_true", help="set up the test environment and run the test suite")

    ext = p.add_argument_group("extensions")
    ext.add_argument("--disable-all-extensions", action="store_true", help="load no extension at all")
    ext.add_argument("--disable-extra-extensions", action="store_true",
                     help="load only the built-in extensions (extensions-builtin/)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; unknown flags are an error, like AUTOMATIC1111's launcher when not running extensions.
    Extensions' `preload.py` add their flags first (`backend.core.extensions.run_preloads`)."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)  # where the extensions are, before their flags exist
    from backend.core.extensions import run_preloads
    run_preloads(parser, first.data_dir, disable_all=first.disable_all_extensions,
                 disable_extra=first.disable_extra_extensions,
                 settings_file=first.ui_settings_file or Path(first.data_dir).expanduser() / "config.json")
    args, unknown = parser.parse_known_args(argv)
    args.unknown = unknown
    if args.port is None:
        args.port = 7861 if args.nowebui else 7860
    return args


def parse_logins(text: str | None) -> list[tuple[str, str]]:
    """"u:p,u2:p2" (commas or newlines) -> [(u, p), ...]. Raises ValueError on malformed entries."""
    if not text:
        return []
    logins = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"login {item!r} is not of the form user:password")
        user, password = item.split(":", 1)
        logins.append((user, password))
    return logins
