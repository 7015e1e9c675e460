"""Inference: KV-cache generation and sampling (`generate`), perplexity (`evaluate`)."""
