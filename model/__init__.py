"""Architectures, loaders and the tokenizer."""
