"""Extra networks in the backend process: reading LoRA/LyCORIS files (`lora_files`), patching the loaded model's
weights (`lora_apply`) and what a generation job does with its `<lora:...>` tags (`activation`)."""
