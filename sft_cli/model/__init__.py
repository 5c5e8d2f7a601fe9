"""Models: backbone loading and building, freeze policies and LoRA, losses, the chunked LM loss, decoding, heap control."""
