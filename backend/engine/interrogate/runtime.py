"""What the backend process keeps for interrogation: the model files, the loaded networks, their device.

One `InterrogateRuntime` lives in the backend process (`WorkerState.interrogate`). Model files are found in
their A1111 folders under `models/`; a missing one is downloaded there on first use (a tqdm bar in the console,
the job's progress bar in the UI), and offline the job fails with a 503 naming the file, the folder and where
to get it. Networks stay loaded between jobs; after each job they go back to the CPU unless the setting
`interrogate_keep_models_in_memory` keeps them on the device (A1111's "Keep models in VRAM").
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Callable

import torch

from backend.core.errors import UserError

log = logging.getLogger("easel.interrogate")


class InterrogateRuntime:
    def __init__(self, models_dir: Path, device: torch.device, half: bool = False):
        self.models_dir = Path(models_dir)
        self.device = device
        self.dtype = torch.float16 if half and device.type == "cuda" else torch.float32
        self.models: dict[str, tuple[tuple, torch.nn.Module]] = {}  # kind -> (file key, network)
        self.loads = 0

    @classmethod
    def from_args(cls, paths, args) -> "InterrogateRuntime":
        from backend.engine.devices.policy import device_for
        half = not (getattr(args, "no_half", False) or getattr(args, "precision", "autocast") == "full")
        return cls(paths.models_dir, device_for(args, "interrogate"), half=half)

    def model_file(self, folder: str, found: Path | None, file_name: str, url: str, what: str,
                   progress: Callable[[int, int], None] | None = None) -> Path:
        """`found`, else `file_name` downloaded from `url` into models/`folder`; offline a 503 saying what to do."""
        if found is not None:
            return found
        from backend.downloads import download_file, network_available

        target = self.models_dir / folder / file_name
        hint = (f"{what} needs the model file {file_name} in {target.parent}. Download it from {url} and put it "
                f"there")
        if not network_available(url):
            raise UserError(f"{hint} (no internet connection was found to download it now).", status=503)
        log.info("downloading %s for %s into %s", file_name, what, target.parent)
        try:
            return download_file(url, target, progress)
        except UserError as exc:
            raise UserError(f"{hint}. The automatic download failed: {exc.message}", status=503) from exc

    def model_folder(self, folder: str, files: dict[str, str], what: str,
                     progress: Callable[[int, int], None] | None = None) -> Path:
        """models/`folder`; when it does not exist, made of `files` ({name: url}) downloaded into it (as A1111 does
        for its category files: a folder that exists is used as it is, even empty)."""
        target = self.models_dir / folder
        if target.is_dir():
            return target
        from backend.downloads import download_file, network_available

        hint = (f"{what} needs the folder {target} with the files {', '.join(files)}. Download them from "
                f"{', '.join(files.values())} and put them there (or make the folder, empty, to use none)")
        if not all(network_available(url) for url in set(files.values())):
            raise UserError(f"{hint} (no internet connection was found to download them now).", status=503)
        part = target.with_name(target.name + ".part")
        try:
            for name, url in files.items():
                download_file(url, part / name, progress)
        except UserError as exc:
            raise UserError(f"{hint}. The automatic download failed: {exc.message}", status=503) from exc
        part.rename(target)
        return target

    def network(self, kind: str, path: Path, load: Callable[[Path], torch.nn.Module]) -> torch.nn.Module:
        """The network of `path` (loaded once per file version) on the device, in the runtime's dtype."""
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        entry = self.models.get(kind)
        if entry is None or entry[0] != key:
            self.models.pop(kind, None)
            gc.collect()
            model = load(path)
            self.loads += 1
            log.info("loaded %s for %s", path.name, kind)
            entry = self.models[kind] = (key, model)
        return entry[1].to(self.device, self.dtype)

    def release(self, keep_in_memory: bool, kinds: tuple[str, ...] | None = None) -> None:
        """After a job (or a step of it: `kinds`): the networks back to the CPU, unless they stay on the device."""
        if keep_in_memory or self.device.type == "cpu":
            return
        for kind, (_, model) in self.models.items():
            if kinds is None or kind in kinds:
                model.to("cpu", torch.float32)
        torch.cuda.empty_cache()

    def clear(self) -> None:
        self.models.clear()
        gc.collect()

    def cached(self) -> list[str]:
        return list(self.models)
