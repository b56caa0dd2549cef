"""PaDT on transformers 5.x."""
__version__ = "0.1.0"
