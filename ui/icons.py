"""Icons and tooltips for the tool buttons, independent of the fonts of the machine showing the page.

AUTOMATIC1111's tool buttons are emoji (🔄 🎲 ♻️ 📒 ...); on a machine without an emoji font they show as empty
boxes. Here an icon-only button keeps its emoji as text for screen readers, but the page draws an SVG icon in its
place (`css()`: the emoji made invisible, the icon as the button's background), and every tool button gets a
tooltip and an accessible name (`HINTS`, applied by ui/javascript/hints.js as A1111's hints.js does).
"""
from __future__ import annotations

import json
from urllib.parse import quote

_STROKE = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#7c8594" ' \
          'stroke-width="2" stroke-linecap="round" stroke-linejoin="round">{}</svg>'

ICONS = {
    "refresh": '<path d="M20 11a8 8 0 1 0-2.3 5.7"/><path d="M20 4v7h-7"/>',
    "dice": '<rect x="4" y="4" width="16" height="16" rx="3"/><circle cx="9" cy="9" r="1.2" fill="#7c8594"/>'
            '<circle cx="15" cy="15" r="1.2" fill="#7c8594"/><circle cx="15" cy="9" r="1.2" fill="#7c8594"/>'
            '<circle cx="9" cy="15" r="1.2" fill="#7c8594"/>',
    "recycle": '<path d="M4 12a8 8 0 0 1 14-5.3L20 9"/><path d="M20 4v5h-5"/><path d="M20 12a8 8 0 0 1-14 5.3L4 15"/>'
               '<path d="M4 20v-5h5"/>',
}

# CSS selector of an icon-only button -> its icon
ICON_BUTTONS = {
    "#refresh_sd_model_checkpoint": "refresh",
    "#extras_refresh_upscalers": "refresh",
    "#refresh_checkpoint_A, #refresh_checkpoint_B, #refresh_checkpoint_C, #modelmerger_refresh_bake_in_vae": "refresh",
    '[id*="_controlnet_unit"][id$="_refresh_models"]': "refresh",  # the units' icon-only refresh
    "#script_txt2img_refiner_checkpoint_refresh, #script_img2img_refiner_checkpoint_refresh": "refresh",
    "#txt2img_random_seed, #img2img_random_seed": "dice",
    "#txt2img_reuse_seed, #img2img_reuse_seed": "recycle",
}

# elem_id -> tooltip (set as the element's title and aria-label when it has none)
HINTS = {
    "refresh_sd_model_checkpoint": "Refresh the list of checkpoints",
    "extras_refresh_upscalers": "Refresh the list of upscalers",
    "script_txt2img_refiner_checkpoint_refresh": "Refresh the list of checkpoints",
    "script_img2img_refiner_checkpoint_refresh": "Refresh the list of checkpoints",
    "refresh_checkpoint_A": "Refresh the list of checkpoints",
    "refresh_checkpoint_B": "Refresh the list of checkpoints",
    "refresh_checkpoint_C": "Refresh the list of checkpoints",
    "modelmerger_refresh_bake_in_vae": "Refresh the list of VAEs",
    "txt2img_random_seed": "Set the seed to -1: a new random seed for every job",
    "img2img_random_seed": "Set the seed to -1: a new random seed for every job",
    "txt2img_reuse_seed": "Reuse the seed of the last generation",
    "img2img_reuse_seed": "Reuse the seed of the last generation",
    "txt2img_paste": "Read the generation parameters from the prompt box (a pasted infotext), or else from the last "
                     "generation, into the controls",
    "img2img_paste": "Read the generation parameters from the prompt box (a pasted infotext), or else from the last "
                     "generation, into the controls",
    "txt2img_clear_prompt": "Clear the prompt and the negative prompt",
    "img2img_clear_prompt": "Clear the prompt and the negative prompt",
    "txt2img_style_apply": "Write the selected styles into the prompts (and empty the selection)",
    "img2img_style_apply": "Write the selected styles into the prompts (and empty the selection)",
    "txt2img_styles_edit_button": "Edit styles: create, change or delete the styles in styles.csv",
    "img2img_styles_edit_button": "Edit styles: create, change or delete the styles in styles.csv",
    "txt2img_res_switch_btn": "Swap width and height",
    "img2img_res_switch_btn": "Swap width and height",
    "img2img_detect_image_size_btn": "Take width and height from the picture in this sub-tab",
    "txt2img_extra_networks": "Show or hide the extra networks (LoRA, embeddings, checkpoints)",
    "img2img_extra_networks": "Show or hide the extra networks (LoRA, embeddings, checkpoints)",
    "txt2img_generate": "Generate (Ctrl+Enter). Right-click: Generate forever",
    "img2img_generate": "Generate (Ctrl+Enter). Right-click: Generate forever",
    "txt2img_interrupt": "Stop the job and keep the pictures made so far (Esc)",
    "img2img_interrupt": "Stop the job and keep the pictures made so far (Esc)",
    "txt2img_skip": "Skip the current picture and go on with the next",
    "img2img_skip": "Skip the current picture and go on with the next",
    "save_txt2img": "Save the selected picture (or all of them) into outputs/log/images, with a line in log.csv",
    "save_img2img": "Save the selected picture (or all of them) into outputs/log/images, with a line in log.csv",
    "save_zip_txt2img": "Make a zip of the pictures shown, to download",
    "save_zip_img2img": "Make a zip of the pictures shown, to download",
    "open_folder_txt2img": "Open the output folder in the file manager",
    "open_folder_img2img": "Open the output folder in the file manager",
}
# tooltips for elements whose id follows a pattern (suffix -> tooltip)
HINT_SUFFIXES = {
    "_refresh_models": "Refresh the list of models",
    "_fill_x": "Fill in all the values the X axis can take",
    "_fill_y": "Fill in all the values the Y axis can take",
    "_fill_z": "Fill in all the values the Z axis can take",
}


def _data_url(name: str) -> str:
    return "data:image/svg+xml," + quote(_STROKE.format(ICONS[name]))


def css() -> str:
    """The icon-only buttons drawn with their SVG icon; their emoji text is kept but not shown."""
    rules = []
    for selector, name in ICON_BUTTONS.items():
        rules.append(f'{selector} {{ background-image: url("{_data_url(name)}") !important; '
                     "background-repeat: no-repeat !important; background-position: center !important; "
                     "background-size: 20px 20px !important; color: transparent !important; "
                     "text-shadow: none !important; min-width: 40px; }")
    return "\n".join(rules) + "\n"


def head() -> str:
    """The tooltips for ui/javascript/hints.js."""
    data = json.dumps({"ids": HINTS, "suffixes": HINT_SUFFIXES})
    return f'<script type="text/javascript">window.easelHints = {data};</script>'
