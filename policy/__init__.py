"""The VLA policy: OpenVLA-OFT-style model, action tokenizer, processor, checkpoints."""
