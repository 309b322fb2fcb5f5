"""Extra networks in the backend process: reading LoRA/LyCORIS files (`lora_files`), patching the loaded model's
weights (`lora_apply`; FLUX/SD3 layer names in `flow_targets`, LoRAs on quantized weights at compute time in
`lora_compute`) and what a generation job does with its `<lora:...>` tags (`activation`)."""
