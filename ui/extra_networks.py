"""The LoRA tab: A1111's extra-network cards for LoRA files and textual-inversion embeddings.

`build(service, prompt, negative_prompt)` lays out two sub-tabs, "Lora" and "Textual Inversion", each
with a search box, a refresh button, a card per file (its preview image when one sits beside it) and a
details view. Clicking a card adds `<lora:name:1>` (or the embedding's name) to the prompt box last
clicked in (the txt2img prompt unless the negative prompt, or an img2img prompt, had the focus);
clicking it again takes it out, as in A1111. The card's "i" button shows the file's metadata (kohya's
`ss_*` fields: base model, training resolution, tags, ...). The cards' clicks are handled in the browser;
searching, refreshing and the metadata view are server events.
"""
from __future__ import annotations

import html
import json

import gradio as gr

from backend.service import EaselService

PROMPT_BOXES = ("txt2img_prompt", "txt2img_neg_prompt", "img2img_prompt", "img2img_neg_prompt")

CARDS_CSS = """
.easel-networks { font-size: 13px; }
.easel-network-status { min-height: 1.4em; margin: 2px 0 6px; opacity: .8; }
.easel-cards { display: flex; flex-wrap: wrap; gap: 10px; }
.easel-card { position: relative; width: 160px; height: 200px; border-radius: 8px; overflow: hidden; cursor: pointer;
  border: 1px solid var(--border-color-primary); background: var(--block-background-fill); }
.easel-card:hover { outline: 2px solid var(--color-accent); }
.easel-card img { width: 100%; height: 100%; object-fit: cover; display: block; }
.easel-card-noimg { width: 100%; height: 100%; display: flex; align-items: center; justify-content: center;
  font-size: 56px; opacity: .25; }
.easel-card-text { position: absolute; left: 0; right: 0; bottom: 0; padding: 6px 8px; color: #fff;
  background: linear-gradient(transparent, rgba(0,0,0,.85)); }
.easel-card-name { font-weight: 600; word-break: break-word; color: #fff !important; }
.easel-card-sub { font-size: 11px; opacity: .85; color: #fff !important; }
.easel-card-info { position: absolute; top: 4px; right: 4px; width: 24px; height: 24px; border-radius: 12px; padding: 0;
  line-height: 24px; text-align: center; font-size: 13px; border: none; background: rgba(0,0,0,.6); color: #fff !important;
  cursor: pointer; font-weight: 700; }
.easel-empty { padding: 16px; opacity: .8; }
"""

# Runs once in the browser when the cards are shown. Clicks are delegated from the component's root
# element, so they keep working after the cards are re-rendered (search, refresh).
CARDS_JS = """
const boxes = %(boxes)s;
if (!window.easelPromptTarget) {
  window.easelPromptTarget = boxes[0];
  document.addEventListener('focusin', (e) => {
    if (e.target.tagName !== 'TEXTAREA') return;
    const box = e.target.closest(boxes.map((b) => '#' + b).join(','));
    if (box) window.easelPromptTarget = box.id;
  });
}
const setValue = (textarea, value) => {
  textarea.value = value;
  textarea.dispatchEvent(new Event('input', {bubbles: true}));
};
element.addEventListener('click', (e) => {
  const info = e.target.closest('.easel-card-info');
  const card = e.target.closest('.easel-card');
  if (!card) return;
  const status = element.querySelector('.easel-network-status');
  if (info) {
    e.stopPropagation();
    const request = document.querySelector('#%(details_request)s textarea');
    if (request) setValue(request, card.dataset.name + '|' + Date.now());
    return;
  }
  const target = window.easelPromptTarget || boxes[0];
  const textarea = document.querySelector('#' + target + ' textarea');
  if (!textarea) return;
  const insert = card.dataset.insert;
  const kind = card.dataset.kind;
  let text = textarea.value;
  let pattern;
  if (kind === 'lora') {
    const name = card.dataset.name.replace(/[.*+?^${}()|[\\]\\\\]/g, '\\\\$&');
    pattern = new RegExp('\\\\s*<(?:lora|lyco):' + name + '(?::[^>]*)?>', 'i');
  } else {
    const word = insert.replace(/[.*+?^${}()|[\\]\\\\]/g, '\\\\$&');
    pattern = new RegExp('(^|[\\\\s,(\\\\[])' + word + '(?=$|[\\\\s,:)\\\\]])');
  }
  const where = target.replace('_neg_prompt', ' negative prompt').replace('_prompt', ' prompt');
  if (pattern.test(text)) {
    text = text.replace(pattern, (m, lead) => (kind === 'lora' ? '' : (lead || ''))).replace(/^\\s+/, '');
    if (status) status.textContent = 'Removed ' + insert + ' from the ' + where + '.';
  } else {
    text = text + (text && !/\\s$/.test(text) ? ' ' : '') + insert;
    if (status) status.textContent = 'Added ' + insert + ' to the ' + where + '.';
  }
  setValue(textarea, text);
});
"""


def _card_html(card, kind: str, index: int) -> str:
    name = html.escape(card.name)
    image = (f'<img src="{card.preview}" alt="" loading="lazy">' if card.preview
             else f'<div class="easel-card-noimg">{html.escape(card.name[:1].upper())}</div>')
    sub = " \u00b7 ".join(x for x in (card.subfolder, card.badge) if x)
    title = html.escape(card.description or card.name, quote=True)
    info = '<button class="easel-card-info" title="Show metadata">i</button>' if kind == "lora" else \
        '<button class="easel-card-info" title="Show details">i</button>'
    return (f'<div class="easel-card" id="{kind}_card_{index}" data-kind="{kind}" data-name="{html.escape(card.name, quote=True)}" '
            f'data-insert="{html.escape(card.insert, quote=True)}" title="{title}">{image}{info}'
            f'<div class="easel-card-text"><div class="easel-card-name">{name}</div>'
            f'<div class="easel-card-sub">{html.escape(sub)}</div></div></div>')


def render_cards(cards: list, kind: str, empty: str) -> str:
    body = "".join(_card_html(c, kind, i) for i, c in enumerate(cards)) or f'<div class="easel-empty">{html.escape(empty)}</div>'
    return (f'<div class="easel-networks" data-kind="{kind}"><div class="easel-network-status"></div>'
            f'<div class="easel-cards">{body}</div></div>')


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><th style='text-align:left;padding-right:12px'>{html.escape(str(k))}</th>"
                    f"<td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def render_lora_details(service: EaselService, name: str) -> str:
    details = service.networks.lora_details(name)
    if details is None:
        return f'<div class="easel-error">LoRA {html.escape(name)} was not found; press the refresh button.</div>'
    parts = [f"<h3>{html.escape(name)}</h3>", _table(details["summary"])]
    if details["tags"]:
        tags = ", ".join(f"{html.escape(t)} ({n})" for t, n in details["tags"])
        parts.append(f"<p><b>Training tags</b>: {tags}</p>")
    if details["metadata"]:
        raw = html.escape(json.dumps(details["metadata"], indent=1, ensure_ascii=False))
        parts.append(f'<details><summary>All metadata ({len(details["metadata"])} fields)</summary>'
                     f'<pre class="easel-infotext">{raw}</pre></details>')
    else:
        parts.append("<p>This file holds no metadata.</p>")
    return f'<div id="lora_details_view">{"".join(parts)}</div>'


def build(service: EaselService, prompt: gr.Textbox, negative_prompt: gr.Textbox) -> None:
    """The "Lora" and "Textual Inversion" sub-tabs; their cards add to `prompt` / `negative_prompt` (and img2img's)."""
    boxes = [b for b in (prompt.elem_id, negative_prompt.elem_id) if b] + [b for b in PROMPT_BOXES
                                                                           if b not in (prompt.elem_id, negative_prompt.elem_id)]
    for box in (prompt, negative_prompt):
        box.focus(None, js=f"() => {{ window.easelPromptTarget = {json.dumps(box.elem_id)}; }}")

    folders = ", ".join(str(d) for d in service.paths.lora_dirs)
    lora_empty = f"No LoRA files found. Put .safetensors files in {folders} (subfolders too), then press refresh."
    ti_empty = f"No embeddings found. Put .pt, .bin or .safetensors embeddings in {service.paths.embeddings_dir}, then press refresh."

    def lora_html(query: str = "") -> str:
        return render_cards(service.networks.lora_cards(query), "lora", lora_empty)

    def ti_html(query: str = "") -> str:
        return render_cards(service.networks.embedding_cards(_checkpoint(service), query), "ti", ti_empty)

    def lora_details_for(name: str) -> str:
        return render_lora_details(service, name)

    def ti_details_for(name: str) -> str:
        card = next((c for c in service.networks.embedding_cards(_checkpoint(service)) if c.name == name), None)
        if card is None:
            return f'<div class="easel-error">Embedding {html.escape(name)} was not found; press the refresh button.</div>'
        rows = {"Name": card.name, "Use": f"write {card.name} in the prompt", "Details": card.description}
        if card.badge in ("does not fit this model", "unreadable"):
            rows["Note"] = f"{card.badge}: it is not used with the selected checkpoint"
        return f'<div id="ti_details_view"><h3>{html.escape(card.name)}</h3>{_table(rows)}</div>'

    gr.Markdown("Click a card to add it to the prompt you last clicked in (txt2img's prompt by default); "
                "click it again to take it out. The **i** button shows what the file says about itself.")
    with gr.Row():
        mirror = gr.Textbox(label="txt2img prompt", interactive=False, lines=2, elem_id="extra_networks_prompt_mirror", scale=3)
        neg_mirror = gr.Textbox(label="txt2img negative prompt", interactive=False, lines=2,
                                elem_id="extra_networks_neg_prompt_mirror", scale=2)
    prompt.change(None, inputs=[prompt], outputs=[mirror], js="(x) => x")
    negative_prompt.change(None, inputs=[negative_prompt], outputs=[neg_mirror], js="(x) => x")

    with gr.Tabs(elem_id="extra_networks_tabs"):
        _cards_tab("Lora", "lora", "Search LoRA...", lora_html, service.refresh_loras, lora_details_for, boxes)
        _cards_tab("Textual Inversion", "ti", "Search embeddings...", ti_html, service.refresh_embeddings,
                   ti_details_for, boxes)


def _cards_tab(label: str, prefix: str, placeholder: str, cards_html, refresh, details_html, boxes: list[str]) -> None:
    """One tab of cards: a search box, a refresh button, the cards, and the details view of the "i" button.

    `cards_html(query)` renders the cards, `refresh()` rescans the files, `details_html(name)` one card's details.
    """
    with gr.Tab(label, id=f"extra_networks_{prefix}") as tab:
        with gr.Row():
            search = gr.Textbox(show_label=False, placeholder=placeholder, elem_id=f"{prefix}_search", scale=6)
            refresh_button = gr.Button("\U0001f504 Refresh", elem_id=f"{prefix}_refresh", size="sm", scale=1, min_width=100)
        cards = gr.HTML(cards_html, elem_id=f"{prefix}_cards", css_template=CARDS_CSS,
                        js_on_load=CARDS_JS % {"boxes": json.dumps(boxes), "details_request": f"{prefix}_details_request"})
        request = gr.Textbox(visible="hidden", elem_id=f"{prefix}_details_request")
        details = gr.HTML("", elem_id=f"{prefix}_details")

    def refreshed(query):
        refresh()
        return cards_html(query)

    def details_for(req: str) -> str:
        name = (req or "").rsplit("|", 1)[0]  # "name|click time": a second click on one card asks again
        return details_html(name) if name else ""

    search.change(cards_html, inputs=[search], outputs=[cards], queue=False, show_progress="hidden")
    refresh_button.click(refreshed, inputs=[search], outputs=[cards])
    tab.select(cards_html, inputs=[search], outputs=[cards], show_progress="hidden")
    request.change(details_for, inputs=[request], outputs=[details], queue=False)


def _checkpoint(service: EaselService):
    try:
        return service.current_checkpoint()
    except Exception:  # noqa: BLE001
        return None
