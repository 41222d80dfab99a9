"""Falcon-H1 parallel-hybrid language models on Megatron Core."""
