"""LoRA/LyCORIS in the backend process: patching the loaded model's weights."""
