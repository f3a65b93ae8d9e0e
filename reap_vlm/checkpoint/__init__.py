"""Checkpoint folders without building the model: reading keys and tensors, quantized formats, safetensors
at byte level, loading policy (device, dtype, the whole model), and writes that are atomic."""
