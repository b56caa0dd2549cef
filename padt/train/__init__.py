"""PaDT supervised fine-tuning: arguments, model and data set-up, the training step and losses, the Trainer.

Run it with `python -m padt.train [--config file.yaml] [--flag value ...]` (see `padt.train.run`).
"""
