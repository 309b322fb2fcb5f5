"""Extra networks as the app lists them: LoRA / LyCORIS files and textual-inversion embeddings (no torch).

- `registry`     the files on disk: listing, metadata, previews, A1111's hashes, the base model a LoRA says it
                 was made for;
- `catalog`      what the UI's Extra Networks cards and the `/sdapi/v1/loras`, `/embeddings` routes show.

The backend's side is `backend.engine.networks`: `lora_files` (read a file into per-module weights and
compute each module's update), `lora_apply` (add the updates to a loaded model's weights and restore the
originals exactly) and `activation` (what a generation job does with the `<lora:...>` tags). Textual
inversion lives in `backend/embeddings.py` (listing) and `backend/engine/embeddings.py` (the vectors).
"""
