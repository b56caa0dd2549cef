"""The PaDT model: configuration, the backbone seam, visual prototypes, the image state, the decoder and the
forward pass (image state -> embeddings -> LLM -> text + VRT logits -> loss)."""
