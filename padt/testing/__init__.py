"""Tiny, fully local stand-ins for tests and toy runs (cf. `transformers.testing_utils`): a trained byte-level
tokenizer and Qwen2.5-VL processor, tiny PaDT configurations and checkpoints, and a tiny training set. No download."""
