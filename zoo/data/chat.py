"""Chat templates: the Jinja template that ships with a checkpoint's tokenizer, rendered as
transformers renders it (`apply_chat_template` with `add_generation_prompt=True`)."""

from __future__ import annotations

import json
import os

from zoo.errors import ZooError


def _token_text(token) -> str | None:
  if isinstance(token, dict):  # an AddedToken written out as {"content": ...}
    token = token.get("content")
  return token if isinstance(token, str) else None


def load_chat_template(directory: str) -> tuple[str, dict]:
  """(template, tokenizer_config) of a checkpoint directory: `chat_template.jinja` (as
  transformers 5 writes it) or the `chat_template` field of `tokenizer_config.json`."""
  config = {}
  path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, ValueError) as e:
      raise ZooError(f"bad JSON in {path}: {e}") from None
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return f.read(), config
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if not isinstance(template, str) or not template:
    raise ZooError(f"{directory} has no chat template (chat_template.jinja or "
                   "tokenizer_config.json's chat_template): drop --chat")
  return template, config


def chat_template_dir(directory: str | None) -> str | None:
  """`directory` when it holds a chat template (`load_chat_template`), else None."""
  if not directory:
    return None
  try:
    load_chat_template(directory)
  except ZooError:
    return None
  return directory


def render_chat(directory: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
  """The text of `messages` ([{"role", "content"}]), by default ending with the header of the
  assistant's next turn."""
  import jinja2  # optional: not a dependency of zoo (transformers and torch bring it)
  from jinja2.sandbox import ImmutableSandboxedEnvironment
  template, config = load_chat_template(directory)

  def raise_exception(message):
    raise ZooError(f"chat template: {message}")

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
  env.globals["raise_exception"] = raise_exception
  try:
    return env.from_string(template).render(
      messages=messages, add_generation_prompt=add_generation_prompt,
      bos_token=_token_text(config.get("bos_token")) or "",
      eos_token=_token_text(config.get("eos_token")) or "")
  except jinja2.TemplateError as e:
    raise ZooError(f"chat template of {directory} failed: {e}") from None
