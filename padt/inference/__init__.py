"""Inference for people: one call from image + prompt to objects (`PaDTPredictor`), pictures, and the Gradio demo."""
