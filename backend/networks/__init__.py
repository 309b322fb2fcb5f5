"""Extra networks: LoRA / LyCORIS files and textual-inversion embeddings.

- `lora_files`   read a LoRA/LyCORIS file into per-module weights, detect its format and base model,
                 and compute each module's weight update (the math of every supported type);
- `lora_apply`   map those modules onto a loaded `SDModel`'s diffusers/transformers modules and
                 add the updates to the weights in place, restoring the originals exactly;
- `registry`     the files on disk: listing, metadata, previews, A1111's hashes (no torch needed);
- `activation`   what a generation job does: read the `<lora:...>` tags, apply, annotate the infotext.

Textual inversion lives in `backend/embeddings.py`.
"""
