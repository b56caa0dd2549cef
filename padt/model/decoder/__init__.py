"""PaDT's light decoder: VRT hidden states -> box, score and mask per object (a SAM-style two-way transformer)."""

from padt.model.decoder.decoder import PaDTDecoder

__all__ = ["PaDTDecoder"]
