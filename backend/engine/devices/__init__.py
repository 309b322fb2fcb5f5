"""Devices: where each model part lives, in which dtype, and how it gets there.

- `policy`: the `DevicePolicy` (compute device, dtypes, residency plan per model, placing and
  releasing a model and the ControlNets beside it) and `Plan`;
- `streaming`: the weight streamer behind --medvram/--lowvram and the cutting of a UNet into units;
- `parts`: a model's text encoders for every family, dtype casts that keep float8/GGUF weights stored, T5's dtype;
- `attention`: A1111's attention flags and the diffusers processors they choose;
- `compilation`: `--compile`;
- `cpu`: the CPU's features (bfloat16 hardware) and thread count.

The names others use are importable from here.
"""
from backend.engine.devices.attention import ATTENTION_CHOICES, attention_from_args, attention_processor, configure_attention
from backend.engine.devices.compilation import compile_unet
from backend.engine.devices.cpu import cpu_bf16_supported, cpu_description, cpu_flags, cpu_model_name, cpu_threads
from backend.engine.devices.parts import cast_floating, encoder_modules, named_encoders, stored_bytes, t5_dtype
from backend.engine.devices.policy import (GiB, INFERENCE_RESERVE, MEDVRAM, MODES, RESIDENT, DevicePolicy, Plan,
                                           device_for)
from backend.engine.devices.streaming import MiB, WeightStreamer, stream_units, tensor_bytes, unet_blocks

__all__ = ["ATTENTION_CHOICES", "GiB", "INFERENCE_RESERVE", "MEDVRAM", "MODES", "MiB", "RESIDENT", "DevicePolicy", "Plan",
           "WeightStreamer", "attention_from_args", "attention_processor", "compile_unet", "configure_attention",
           "cpu_bf16_supported", "cpu_description", "cpu_flags", "cpu_model_name", "cpu_threads", "device_for", "stream_units",
           "tensor_bytes", "unet_blocks", "cast_floating", "encoder_modules", "named_encoders", "stored_bytes",
           "t5_dtype"]
