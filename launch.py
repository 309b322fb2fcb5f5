"""Easel launcher: one command sets everything up and starts the UI.

    python3 launch.py [flags]          # create/use ./venv, install requirements, start app.py
    python3 launch.py --run-tests      # the same environment plus test tools, then the whole test suite

Uses only the standard library, so it runs with any Python 3.11+ before anything is installed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("EASEL_VENV", ROOT / "venv"))
sys.path.insert(0, str(ROOT))

from backend.core.cmd_args import RESTART_EXIT_CODE, parse_args  # noqa: E402  (standard library only)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list, **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def requirements_stamp(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


NEEDED_DISK_GB = 8  # torch with its CUDA libraries, diffusers, gradio and the test tools: about 7 GB in the venv


def warn_if_disk_is_short(folder: Path) -> None:
    """Say before a long install, not after it, when the disk cannot hold the environment."""
    free_gb = shutil.disk_usage(folder if folder.exists() else folder.parent).free / 2**30
    if free_gb < NEEDED_DISK_GB:
        print(f"warning: {free_gb:.1f} GB free on the disk of {folder}; installing the requirements needs about "
              f"{NEEDED_DISK_GB} GB. Free some space (or set EASEL_VENV to a folder on a larger disk) if pip fails "
              "with 'No space left on device'.", file=sys.stderr, flush=True)


def prepare_environment(with_tests: bool) -> Path:
    """Create the virtual environment if needed and install the pinned requirements (once per change)."""
    if not venv_python().exists():
        run([sys.executable, "-m", "venv", VENV])
    files = [ROOT / "requirements.txt"] + ([ROOT / "requirements-test.txt"] if with_tests else [])
    # packages whose declared dependencies must not be installed (the tests' own: k-diffusion, whose samplers the
    # sampler tests compare with, declares its training tools: wandb, clean-fid, CLIP, ...)
    nodeps = [ROOT / "requirements-nodeps.txt"] + ([ROOT / "requirements-test-nodeps.txt"] if with_tests else [])
    stamp_file = VENV / (".easel-requirements-tests" if with_tests else ".easel-requirements")
    stamp = requirements_stamp(files + nodeps)
    if not stamp_file.exists() or stamp_file.read_text() != stamp:
        warn_if_disk_is_short(VENV)
        # --no-cache-dir: the downloaded wheels are not kept a second time in pip's cache (several GB with torch)
        cmd = [venv_python(), "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir"]
        for f in files:
            cmd += ["-r", f]
        run(cmd)
        cmd = [venv_python(), "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir", "--no-deps"]
        for f in nodeps:
            cmd += ["-r", f]
        run(cmd)
        stamp_file.write_text(stamp)
    return venv_python()


def ensure_browser() -> None:
    """The browser tests drive Debian's Chromium; install it when missing and we may (root with apt)."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", "chromium"], env=env)
    else:
        print("chromium is not installed: the browser tests will be skipped (install Debian's 'chromium' package).", flush=True)


EXEC_IN_PLACE = os.name == "posix"  # hand_over replaces the launcher process (else: runs a child)


def hand_over(cmd: list, restart_code: int | None = None) -> int:
    """Run `cmd` in the launcher's place, so that a signal meant for the launcher reaches it.

    On POSIX the launcher process becomes `cmd` (exec): same pid, so SIGTERM or SIGINT from a service
    manager, a terminal or `kill` stops the app (and with it the backend process) rather than leaving it
    running orphaned. Elsewhere the command runs as a child that receives Ctrl+C with the console, and the
    launcher waits for it to end, and starts it again when it exits with `restart_code` (app.py after
    /sdapi/v1/server-restart; on POSIX app.py re-executes itself instead).
    """
    cmd = [str(c) for c in cmd]
    os.chdir(ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    if EXEC_IN_PLACE:
        os.execv(cmd[0], cmd)
    while True:
        child = subprocess.Popen(cmd, cwd=ROOT)
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                continue  # the child got the console's Ctrl+C too: wait for it to stop
        if restart_code is None or code != restart_code:
            return code
        print("Restarting Easel.", flush=True)


def run_test_suite(python: Path) -> int:
    """The whole suite spread over the CPU cores (pytest-xdist): the browser tests as one group on one worker, one
    after another (they wait for what a page shows; two at once on a small machine delay each other past their
    patience), every other test file as a unit on the other workers (conftest gives the groups)."""
    os.chdir(ROOT)
    workers = max(1, min(4, os.cpu_count() or 1))
    spread = ["-n", str(workers), "--dist", "loadgroup"] if workers > 1 else []
    # the slowest tests listed at the end: where the suite's time goes, read from any run's log
    return subprocess.call([str(python), "-m", "pytest", "-q", "--durations=25", *spread], cwd=ROOT)


def main() -> int:
    args = parse_args(sys.argv[1:])
    rest = [a for a in sys.argv[1:] if a != "--run-tests"]
    if args.run_tests:
        python = prepare_environment(with_tests=True)
        ensure_browser()
        pytest_args = [a for a in rest if a != "--skip-install"]
        if pytest_args:  # the user's own selection / options: one pytest run, as given
            return hand_over([python, "-m", "pytest", "-q", *pytest_args])
        return run_test_suite(python)
    python = (Path(sys.executable) if args.skip_install or args.skip_prepare_environment
              else prepare_environment(with_tests=False))
    if not (args.skip_install or args.skip_prepare_environment):  # as A1111: with the requirements
        import logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from backend.extensions import run_installers
        run_installers(python, args)  # each enabled extension's install.py, once (gated by --listen/--share)
    return hand_over([python, ROOT / "app.py", *[a for a in rest if a != "--skip-install"]], RESTART_EXIT_CODE)


if __name__ == "__main__":
    sys.exit(main())
