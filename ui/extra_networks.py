"""AUTOMATIC1111's extra-networks panel: cards below the prompts of txt2img and img2img.

`build_panel(service, tab, toggle)` lays out the panel, hidden until the tab's toggle button beside the prompts
opens it: a sub-tab per kind (Textual Inversion, Hypernetworks, Checkpoints, Lora, in A1111's order), each with a search box,
sort order (name, date modified, path) and direction, a refresh button, the cards (a file's preview image when one
sits beside it) and the details view of a card's "i" button. Card sizes follow the `extra_networks_card_width` /
`extra_networks_card_height` settings.

Clicking a LoRA card adds `<lora:name:weight>` (the weight: the file's preferred weight, else the
`extra_networks_default_multiplier` setting), a hypernetwork card `<hypernet:name:multiplier>`, an embedding
card the embedding's name, to the prompt box of that
tab that had the focus last (the positive prompt until one was clicked); clicking it again takes it out, as in
A1111. A checkpoint card selects its checkpoint: it writes the title into `checkpoint_request()`, which the
layout wires to the checkpoint dropdown's own handler. Card clicks are handled in the browser; rendering,
searching, sorting, refreshing and the details are server events.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from backend.networks.catalog import SORT_KEYS, Card, sort_cards
from backend.service import EaselService

CHECKPOINT_REQUEST = "extra_networks_checkpoint_request"
DEFAULT_CARD_SIZE = (160, 200)

CARDS_CSS = """
.easel-networks { font-size: 13px; }
.easel-network-status { min-height: 1.4em; margin: 2px 0 6px; opacity: .8; }
.easel-cards { display: flex; flex-wrap: wrap; gap: 10px; }
.easel-card { position: relative; width: var(--easel-card-width, 160px); height: var(--easel-card-height, 200px);
  border-radius: 8px; overflow: hidden; cursor: pointer;
  border: 1px solid var(--border-color-primary); background: var(--block-background-fill); }
.easel-card:hover { outline: 2px solid var(--color-accent); }
.easel-card img { width: 100%; height: 100%; object-fit: cover; display: block; }
.easel-card-noimg { width: 100%; height: 100%; display: flex; align-items: center; justify-content: center;
  font-size: 56px; opacity: .25; }
.easel-card-text { position: absolute; left: 0; right: 0; bottom: 0; padding: 6px 8px; color: #fff;
  background: linear-gradient(transparent, rgba(0,0,0,.85)); }
.easel-card-name { font-weight: 600; word-break: break-word; color: #fff !important; }
.easel-card-sub { font-size: 11px; opacity: .85; color: #fff !important; word-break: break-word; }
.easel-card-info { position: absolute; top: 4px; right: 4px; width: 24px; height: 24px; border-radius: 12px; padding: 0;
  line-height: 24px; text-align: center; font-size: 13px; border: none; background: rgba(0,0,0,.6); color: #fff !important;
  cursor: pointer; font-weight: 700; }
.easel-empty { padding: 16px; opacity: .8; }
"""

# Runs in the browser when a kind's cards element appears. Clicks are delegated from the component's root
# element, so they keep working after the cards are re-rendered (search, sort, refresh). The prompt box each
# tab's cards write to is the one of that tab that had the focus last: ui/javascript/extra_networks.js
# remembers it from the page's start.
CARDS_JS = """
const tab = %(tab)s;
const boxes = [tab + '_prompt', tab + '_neg_prompt'];
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
  const insert = card.dataset.insert;
  const kind = card.dataset.kind;
  if (kind === 'checkpoint') {
    const request = document.querySelector('#%(checkpoint_request)s textarea');
    if (request) setValue(request, insert + '|' + Date.now());
    if (status) status.textContent = 'Selecting the checkpoint ' + insert + '...';
    return;
  }
  const target = (window.easelPromptTargets || {})[tab] || boxes[0];
  const textarea = document.querySelector('#' + target + ' textarea');
  if (!textarea) return;
  let text = textarea.value;
  let pattern;
  const tagged = kind === 'lora' || kind === 'hypernet';
  if (tagged) {
    const name = card.dataset.name.replace(/[.*+?^${}()|[\\]\\\\]/g, '\\\\$&');
    const tags = kind === 'lora' ? '(?:lora|lyco)' : 'hypernet';
    pattern = new RegExp('\\\\s*<' + tags + ':' + name + '(?::[^>]*)?>', 'i');
  } else {
    const word = insert.replace(/[.*+?^${}()|[\\]\\\\]/g, '\\\\$&');
    pattern = new RegExp('(^|[\\\\s,(\\\\[])' + word + '(?=$|[\\\\s,:)\\\\]])');
  }
  const where = tab + (target.endsWith('_neg_prompt') ? ' negative prompt' : ' prompt');
  if (pattern.test(text)) {
    text = text.replace(pattern, (m, lead) => (tagged ? '' : (lead || ''))).replace(/^\\s+/, '');
    if (status) status.textContent = 'Removed ' + insert + ' from the ' + where + '.';
  } else {
    text = text + (text && !/\\s$/.test(text) ? ' ' : '') + insert;
    if (status) status.textContent = 'Added ' + insert + ' to the ' + where + '.';
  }
  setValue(textarea, text);
});
"""


@dataclass
class NetworkKind:
    """One sub-tab of the panel: how to list its cards, rescan its files and describe one card."""

    key: str  # in elem_ids: {tab}_{key}_cards, ...
    label: str
    card_kind: str  # the cards' data-kind, which the browser code acts on
    placeholder: str
    cards: Callable[[str], list[Card]]  # query -> the matching cards
    refresh: Callable[[], None]
    empty: str
    details: Callable[[str], str] | None = None  # card name -> HTML of the "i" view; None: no "i" button


def _card_html(card: Card, kind: str, tab: str, index: int, with_info: bool) -> str:
    name = html.escape(card.name)
    image = (f'<img src="{card.preview}" alt="" loading="lazy">' if card.preview
             else f'<div class="easel-card-noimg">{html.escape(card.name[:1].upper())}</div>')
    sub = " \u00b7 ".join(x for x in (card.subfolder, card.badge) if x)
    title = html.escape(card.description or card.name, quote=True)
    info = '<button class="easel-card-info" title="Show details">i</button>' if with_info else ""
    return (f'<div class="easel-card" id="{tab}_{kind}_card_{index}" data-kind="{kind}" '
            f'data-name="{html.escape(card.name, quote=True)}" data-insert="{html.escape(card.insert, quote=True)}" '
            f'title="{title}">{image}{info}'
            f'<div class="easel-card-text"><div class="easel-card-name">{name}</div>'
            f'<div class="easel-card-sub">{html.escape(sub)}</div></div></div>')


def render_cards(cards: list[Card], kind: str, empty: str, tab: str = "txt2img", with_info: bool = True,
                 size: tuple[int, int] = DEFAULT_CARD_SIZE) -> str:
    """The cards of one kind (or the `empty` message), at `size` (width, height) pixels."""
    body = ("".join(_card_html(c, kind, tab, i, with_info) for i, c in enumerate(cards))
            or f'<div class="easel-empty">{html.escape(empty)}</div>')
    style = f"--easel-card-width:{size[0]}px;--easel-card-height:{size[1]}px"
    return (f'<div class="easel-networks" data-kind="{kind}"><div class="easel-network-status"></div>'
            f'<div class="easel-cards" style="{style}">{body}</div></div>')


def card_size(options) -> tuple[int, int]:
    """A1111's `extra_networks_card_width` / `_height` settings; 0 means the default size."""
    width = int(options["extra_networks_card_width"] or 0) or DEFAULT_CARD_SIZE[0]
    height = int(options["extra_networks_card_height"] or 0) or DEFAULT_CARD_SIZE[1]
    return width, height


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
    return f'<div class="easel-network-details">{"".join(parts)}</div>'


def render_ti_details(service: EaselService, name: str) -> str:
    card = next((c for c in service.networks.embedding_cards(_checkpoint(service)) if c.name == name), None)
    if card is None:
        return f'<div class="easel-error">Embedding {html.escape(name)} was not found; press the refresh button.</div>'
    rows = {"Name": card.name, "Use": f"write {card.name} in the prompt", "Details": card.description}
    if card.badge in ("does not fit this model", "unreadable"):
        rows["Note"] = f"{card.badge}: it is not used with the selected checkpoint"
    return f'<div class="easel-network-details"><h3>{html.escape(card.name)}</h3>{_table(rows)}</div>'


def network_kinds(service: EaselService) -> list[NetworkKind]:
    """The panel's sub-tabs, in A1111's order."""
    folders = ", ".join(str(d) for d in service.paths.lora_dirs)
    hyper_folders = ", ".join(str(d) for d in service.paths.hypernetwork_dirs)
    return [
        NetworkKind("ti", "Textual Inversion", "ti", "Search embeddings...",
                    lambda q: service.networks.embedding_cards(_checkpoint(service), q), service.refresh_embeddings,
                    f"No embeddings found. Put .pt, .bin or .safetensors embeddings in {service.paths.embeddings_dir}, "
                    "then press refresh.", lambda name: render_ti_details(service, name)),
        NetworkKind("hypernetworks", "Hypernetworks", "hypernet", "Search hypernetworks...",
                    lambda q: service.networks.hypernetwork_cards(
                        q, float(service.options["extra_networks_default_multiplier"])),
                    service.networks.refresh_hypernetworks,
                    f"No hypernetworks found. Put A1111 hypernetwork .pt files in {hyper_folders}, then press refresh."),
        NetworkKind("checkpoints", "Checkpoints", "checkpoint", "Search checkpoints...",
                    lambda q: service.networks.checkpoint_cards(service.registry.checkpoints, q),
                    service.refresh_checkpoints, service.no_checkpoint_message() or "No checkpoints found."),
        NetworkKind("lora", "Lora", "lora", "Search LoRA...",
                    lambda q: service.networks.lora_cards(q, float(service.options["extra_networks_default_multiplier"])),
                    service.refresh_loras,
                    f"No LoRA files found. Put .safetensors files in {folders} (subfolders too), then press refresh.",
                    lambda name: render_lora_details(service, name)),
    ]


def checkpoint_request() -> gr.Textbox:
    """The hidden box a checkpoint card writes "title|click time" into; the layout selects that checkpoint."""
    return gr.Textbox(visible="hidden", elem_id=CHECKPOINT_REQUEST)


def requested_checkpoint(request: str) -> str:
    """The checkpoint title of a `checkpoint_request` value ("title|click time": a second click asks again)."""
    return (request or "").rsplit("|", 1)[0]


def build_panel(service: EaselService, tab: str, toggle: gr.Button) -> gr.Column:
    """The panel of `tab` ("txt2img" / "img2img"), opened and closed by `toggle`. Returns the panel."""
    is_open = gr.State(False)
    with gr.Column(visible=False, elem_id=f"{tab}_extra_networks_panel") as panel:
        with gr.Tabs(elem_id=f"{tab}_extra_tabs"):
            renders = [_kind_tab(service, tab, kind) for kind in network_kinds(service)]
    controls = [c for render in renders for c in render["inputs"]]

    def flip(opened: bool):
        return not opened, gr.update(visible=not opened)

    def render_all(opened: bool, *values):
        if not opened:
            return [gr.update() for _ in renders]
        values = list(values)
        return [render["html"](*values[3 * i:3 * i + 3]) for i, render in enumerate(renders)]

    toggle.click(flip, inputs=[is_open], outputs=[is_open, panel], queue=False).then(
        render_all, inputs=[is_open] + controls, outputs=[render["cards"] for render in renders], queue=False,
        show_progress="hidden")
    return panel


def _kind_tab(service: EaselService, tab: str, kind: NetworkKind) -> dict:
    """One sub-tab: search, sort, direction, refresh, the cards and the details view.

    Returns {"cards": the HTML component, "inputs": [search, sort, descending], "html": render(query, sort, desc)}.
    """
    prefix = f"{tab}_{kind.key}"
    with gr.Tab(kind.label, id=prefix, elem_id=f"{prefix}_tab") as sub_tab:
        with gr.Row():
            search = gr.Textbox(show_label=False, placeholder=kind.placeholder, elem_id=f"{prefix}_search", scale=6)
            sort = gr.Dropdown(list(SORT_KEYS), value=SORT_KEYS[0], show_label=False, elem_id=f"{prefix}_sort",
                               scale=2, min_width=150)
            direction = gr.Button("\u2191 Ascending", elem_id=f"{prefix}_sort_dir", size="sm", scale=1, min_width=120)
            refresh_button = gr.Button("Refresh", elem_id=f"{prefix}_refresh", size="sm", scale=1,
                                       min_width=100)
        descending = gr.State(False)
        details_request = f"{prefix}_details_request"
        cards = gr.HTML("", elem_id=f"{prefix}_cards", css_template=CARDS_CSS,
                        js_on_load=CARDS_JS % {"tab": json.dumps(tab), "details_request": details_request,
                                               "checkpoint_request": CHECKPOINT_REQUEST})
        if kind.details is not None:
            request = gr.Textbox(visible="hidden", elem_id=details_request)
            details = gr.HTML("", elem_id=f"{prefix}_details")

    def cards_html(query: str, sort_key: str, desc: bool) -> str:
        return render_cards(sort_cards(kind.cards(query or ""), sort_key, bool(desc)), kind.card_kind, kind.empty,
                            tab, with_info=kind.details is not None, size=card_size(service.options))

    def refreshed(query, sort_key, desc):
        kind.refresh()
        return cards_html(query, sort_key, desc)

    def flipped(query, sort_key, desc):
        desc = not desc
        return desc, gr.update(value="\u2193 Descending" if desc else "\u2191 Ascending"), cards_html(query, sort_key, desc)

    inputs = [search, sort, descending]
    quiet = {"queue": False, "show_progress": "hidden"}
    search.change(cards_html, inputs=inputs, outputs=[cards], **quiet)
    sort.change(cards_html, inputs=inputs, outputs=[cards], **quiet)
    direction.click(flipped, inputs=inputs, outputs=[descending, direction, cards], **quiet)
    refreshed_event = refresh_button.click(refreshed, inputs=inputs, outputs=[cards])
    if kind.card_kind == "checkpoint":  # the checkpoint dropdown at the top lists the rescanned files too
        refreshed_event.then(None, js="() => { const b = document.querySelector('#refresh_sd_model_checkpoint'); "
                                      "if (b) b.click(); }")
    sub_tab.select(cards_html, inputs=inputs, outputs=[cards], show_progress="hidden")
    if kind.details is not None:
        def details_for(req: str) -> str:
            name = (req or "").rsplit("|", 1)[0]  # "name|click time": a second click on one card asks again
            return kind.details(name) if name else ""

        request.change(details_for, inputs=[request], outputs=[details], queue=False)
    return {"cards": cards, "inputs": inputs, "html": cards_html}


def _checkpoint(service: EaselService):
    try:
        return service.current_checkpoint()
    except Exception:  # noqa: BLE001  (no checkpoint at all: every embedding is listed as it is)
        return None
