"""Running a backend job from a Gradio event with a live progress bar and preview."""
from __future__ import annotations

import html
import io

from PIL import Image

from backend.client import Job


def progress_html(job: Job, queued_ahead: int = 0) -> str:
    if job.status == "queued":
        ahead = f" ({queued_ahead} ahead)" if queued_ahead else ""
        return f'<div class="easel-progress"><span class="easel-progress-text">Waiting in queue{ahead}...</span></div>'
    if job.total == 0:  # started, but not sampling yet: loading the checkpoint, encoding the prompt
        return '<div class="easel-progress"><span class="easel-progress-text">Preparing (loading the model if needed)...</span></div>'
    pct = int(job.progress * 100)
    eta = job.eta
    eta_text = f", ETA {int(eta // 60)}:{int(eta % 60):02d}" if eta else ""
    batch = f" - batch {job.job_no + 1}/{job.job_count}" if job.job_count > 1 else ""
    return (f'<div class="easel-progress"><div class="easel-progress-bar" style="width:{pct}%"></div>'
            f'<span class="easel-progress-text">Step {job.step}/{job.total} ({pct}%){eta_text}{batch}</span></div>')


def preview_image(job: Job) -> Image.Image | None:
    if not job.preview_png:
        return None
    return Image.open(io.BytesIO(job.preview_png))


def workers_html(workers: list[dict]) -> str:
    """The backend workers as a small table (the data of GET /sdapi/v1/workers): name, state, device, jobs done,
    loaded checkpoints."""
    if not workers:
        return '<div class="easel-workers">No backend worker.</div>'
    rows = []
    for w in workers:
        ckpts = ", ".join(c.replace("\\", "/").rsplit("/", 1)[-1] for c in w.get("checkpoints", [])) or "-"
        rows.append(f'<tr class="easel-worker-{html.escape(w["state"])}"><td>{html.escape(w["name"])}</td>'
                    f'<td>{html.escape(w["state"])}</td><td>{html.escape(str(w.get("device") or "-"))}</td>'
                    f'<td>{w.get("pid") or "-"}</td><td>{w.get("jobs_done", 0)}</td><td>{html.escape(ckpts)}</td></tr>')
    return ('<table class="easel-workers"><thead><tr><th>Worker</th><th>State</th><th>Device</th><th>pid</th>'
            '<th>Jobs done</th><th>Checkpoints loaded</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def info_html(text: str, error: bool = False) -> str:
    cls = "easel-error" if error else "easel-infotext"
    body = html.escape(text).replace("\n", "<br>")
    return f'<div class="{cls}">{body}</div>'


async def wait_with_updates(job: Job, client, interval: float = 0.4):
    """Yield (progress html, new preview or None) while the job waits or runs; awaits, holding no thread."""
    last_preview = -1
    while not await job.wait_async(interval):
        preview = None
        if job.preview_id != last_preview:
            last_preview = job.preview_id
            preview = preview_image(job)
        yield progress_html(job, client.position(job)), preview
