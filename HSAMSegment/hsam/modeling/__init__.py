"""The H-SAM network in PyTorch: image encoder with LoRA, prompt-free and prior encoders, both decoding stages."""
