"""PaDT's light decoder: VRT hidden states -> box, score and mask per object (a SAM-style two-way transformer).

`decoder` (PaDTDecoder: queries, stages, heads, input checks), `layers` (RMSNorm, MLP, TwoWayBlock: the reference
math), `attention` (packed varlen attention: backends and the attention module), `fused` (the fp32 CPU kernels),
`vl_decode` (batch packing around the decoder).
"""

from padt.model.decoder.decoder import PaDTDecoder

__all__ = ["PaDTDecoder"]
