"""Data for training: tokenizers, TFDS sources, and grain pipelines that pack documents.

Batches are dicts of numpy arrays, all [batch, seq_len]:
  tokens      int32    model input
  targets     int32    the next token of each position
  positions   int32    position within the document (restarts at every packed document)
  segment_ids int32    1, 2, ... per packed document; 0 marks padding
  weights     float32  per-token loss weight (0 for padding and tokens without a target)
"""
