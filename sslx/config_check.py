"""Friendly validation of command-line config overrides.

ml_collections rejects an unknown `--config.a.b=v` with a deep traceback; users
deserve one line naming the valid keys. This runs before absl parses the flags.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def load_config_file(spec: str):
  """Loads `path.py[:preset]` the way config_flags does and returns the ConfigDict."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location("_sslx_config", path)
  if module_spec is None or module_spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} is not a Python module")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _keys(d: Any, prefix: str = "") -> list[str]:
  out = []
  for k, v in d.items():
    out.append(prefix + k)
    if hasattr(v, "items"):
      out.extend(_keys(v, prefix + k + "."))
  return out


def unknown_override_message(argv: list[str]) -> str | None:
  """Returns an error message if an override names no config key, else None."""
  spec = None
  overrides = []
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif a.startswith("--config."):
      overrides.append(a[len("--config.") :].split("=", 1)[0])
  if spec is None:
    return None
  try:
    config = load_config_file(spec)
  except Exception as e:  # One line instead of config_flags' traceback.
    return f"error: could not load --config={spec}: {e}"
  valid = set(_keys(config.to_dict()))
  for key in overrides:
    if key not in valid:
      parent = key.rpartition(".")[0]
      siblings = sorted(k for k in valid if k.rpartition(".")[0] == parent)
      where = f"under '{parent}'" if parent else "at the top level"
      return (
        f"error: unknown config key '{key}' in --config.{key}=...; valid keys {where}: "
        + ", ".join(siblings)
      )
  return None
