"""Fixtures of the data tests."""

import pytest


@pytest.fixture
def tok_dir(tmp_path):
  """(directory, transformers' tokenizer) of the word-level test tokenizer written there."""
  from tests.references import with_tokenizer
  return str(tmp_path), with_tokenizer(str(tmp_path))
