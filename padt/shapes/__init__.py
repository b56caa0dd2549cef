"""The synthetic shapes benchmark (not part of PaDT itself): scenes of coloured shapes with exact boxes and masks in
the released JSONL format, and the from-scratch training aids its tiny model uses (stage-0 vision pretraining and the
cell-class loss)."""
