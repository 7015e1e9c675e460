"""Data for training: tokenizers, TFDS sources, and grain pipelines that pack documents.

Batches are dicts of numpy arrays, all [batch, seq_len]:
  tokens      int32    model input
  targets     int32    the next token of each position
  positions   int32    position within the document (restarts at every packed document)
  segment_ids int32    1, 2, ... per packed document; 0 marks padding
  weights     float32  per-token loss weight (0 for padding and tokens without a target)

A document is [bos] + encode(text) + [eos]; its inputs are tokens[:-1] and its targets tokens[1:],
so a target never comes from the next document. A document longer than seq_len is cut into pieces
of at most seq_len (input, target) pairs, each its own segment with positions from 0. Padding
is all zeros: segment_id 0, weight 0, token 0.

  tokenizers.py  load_tokenizer (SentencePiece, LLaMA 3 tiktoken, HF tokenizer.json),
                 train_sentencepiece
  sources.py     text_source: local text/JSONL files or the Python stdlib built into an
                 array_record TFDS dataset, or any prepared TFDS dataset
  pipeline.py    make_batches / data_pipeline (grain, checkpointable), tokenizer_for
"""
