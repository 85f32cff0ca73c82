"""Stage 1: supervised fine-tuning on chat data (`python -m sft`, `make sft`)."""
