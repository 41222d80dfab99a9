"""Falcon-H1 parallel-hybrid language models on Megatron Core."""

from falcon_h1.quiet import quiet_third_party_notices

# Every process of a run (the command's, torchrun's, Lightning's) imports this package before
# Megatron, which warns at import: the filters go in first.
quiet_third_party_notices()
