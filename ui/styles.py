"""The Styles controls beside Generate (AUTOMATIC1111's `ui_prompt_styles`): a multi-select of the styles in
styles.csv applied to the job's prompts, a button that writes the selected styles into the prompt boxes, and a
style editor (pick or name a style, copy the prompts into it, save, delete).

The styles themselves are `backend.core.styles.StyleDatabase` (the service's `styles`): the UI reads and edits them
only through it, so a style saved here is in the API's /sdapi/v1/prompt-styles at once.
"""
from __future__ import annotations

import html

import gradio as gr

from backend.core.errors import UserError
from backend.service import EaselService


def _names(service: EaselService) -> list[str]:
    return service.styles.names()


def build(service: EaselService, tab: str, c: dict) -> None:
    """Add `c["styles"]` (the request's `styles` field) and the editor, wired to the tab's prompt boxes."""
    c["styles"] = gr.Dropdown(_names(service), value=[], multiselect=True, label="Styles", elem_id=f"{tab}_styles",
                              info="applied to the prompts of every job (styles.csv)")
    with gr.Row(elem_classes=["easel-tool-row"]):
        apply = gr.Button("Apply styles", size="sm", elem_id=f"{tab}_style_apply", min_width=60,
                          elem_classes=["easel-tool"])
        edit = gr.Button("Edit styles", size="sm", elem_id=f"{tab}_styles_edit_button", min_width=60,
                         elem_classes=["easel-tool"])
    with gr.Group(visible=False, elem_id=f"{tab}_styles_dialog") as dialog:
        name = gr.Dropdown(_names(service), value=None, label="Style (pick one, or type a new name)",
                           allow_custom_value=True, elem_id=f"{tab}_edit_style_name")
        style_prompt = gr.Textbox(label="Style prompt ({prompt} marks where the prompt goes)", lines=2,
                                  elem_id=f"{tab}_edit_style_prompt")
        style_negative = gr.Textbox(label="Style negative prompt", lines=2, elem_id=f"{tab}_edit_style_neg_prompt")
        with gr.Row():
            copy = gr.Button("Copy from prompts", size="sm", elem_id=f"{tab}_style_copy")
            save = gr.Button("Save", size="sm", variant="primary", elem_id=f"{tab}_style_save")
            delete = gr.Button("Delete", size="sm", variant="stop", elem_id=f"{tab}_style_delete")
            close = gr.Button("Close", size="sm", elem_id=f"{tab}_style_close")
        status = gr.HTML(elem_id=f"{tab}_style_status")

    prompt, negative = c["prompt"], c["negative_prompt"]

    def on_apply(p: str, n: str, chosen: list[str]):
        """The selected styles written into the prompts, the selection emptied (so they do not apply twice)."""
        p, n = service.styles.apply(p or "", n or "", list(chosen or []))
        return p, n, gr.update(value=[], choices=_names(service))

    apply.click(on_apply, [prompt, negative, c["styles"]], [prompt, negative, c["styles"]], queue=False)

    def on_edit():
        names = _names(service)
        return gr.update(visible=True), gr.update(choices=names), gr.update(choices=names), ""

    edit.click(on_edit, None, [dialog, name, c["styles"], status], queue=False)
    close.click(lambda: gr.update(visible=False), None, dialog, queue=False)

    def on_pick(style_name: str | None):
        style = service.styles.get(style_name) if style_name else None
        if style is None:  # a new name: keep what is typed in the boxes
            return gr.update(), gr.update()
        return style.prompt, style.negative_prompt

    name.change(on_pick, name, [style_prompt, style_negative], queue=False)
    copy.click(lambda p, n: (p, n), [prompt, negative], [style_prompt, style_negative], queue=False)

    def on_save(style_name, text, negative_text, chosen):
        try:
            style = service.styles.save_style(style_name or "", text or "", negative_text or "")
        except (UserError, OSError) as exc:
            message = exc.message if isinstance(exc, UserError) else f"The style could not be saved: {exc}"
            return gr.update(), gr.update(), f'<p class="easel-error">{html.escape(message)}</p>'
        names = _names(service)
        return (gr.update(choices=names, value=style.name), gr.update(choices=names, value=list(chosen or [])),
                f"<p>Saved style {html.escape(style.name)!s}.</p>")

    save.click(on_save, [name, style_prompt, style_negative, c["styles"]], [name, c["styles"], status], queue=False)

    def on_delete(style_name, chosen):
        try:
            service.styles.delete_style(style_name or "")
        except (UserError, OSError) as exc:
            message = exc.message if isinstance(exc, UserError) else f"The style could not be deleted: {exc}"
            return gr.update(), gr.update(), gr.update(), gr.update(), f'<p class="easel-error">{html.escape(message)}</p>'
        names = _names(service)
        kept = [s for s in chosen or [] if s in names]
        return (gr.update(choices=names, value=None), "", "", gr.update(choices=names, value=kept),
                f"<p>Deleted style {html.escape(style_name)}.</p>")

    delete.click(on_delete, [name, c["styles"]], [name, style_prompt, style_negative, c["styles"], status], queue=False)
