"""The small parts of the decoder: linear and embedding, RMSNorm, RoPE, attention, MLP, MoE."""
