"""The repository stands on its own: no tracked file points at notes that live outside it.

Reasons belong in the code's comments or in docs/ (docs/fidelity.md for the official
implementations); a reference to a file a reader of this repository does not have is a dead end.
"""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.relpath(os.path.abspath(__file__), ROOT)
OUTSIDE = re.compile(r"\.\./shared|gotcha|spec §", re.IGNORECASE)


def _tracked_files() -> list[str]:
  if shutil.which("git") is None:
    pytest.skip("needs git to list the tracked files")
  out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
  if out.returncode:
    pytest.skip("not a git checkout: no tracked files to check")
  return [p for p in out.stdout.decode().split("\0") if p and p != THIS]


def test_no_references_outside_the_repository():
  hits = []
  for path in _tracked_files():
    try:
      with open(os.path.join(ROOT, path), "rb") as f:
        data = f.read()
    except (FileNotFoundError, IsADirectoryError):
      continue  # deleted in the work tree but still tracked, or a submodule
    if b"\0" in data[:8192]:
      continue  # binary (images, npz, gzip)
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
      if OUTSIDE.search(line):
        hits.append(f"{path}:{number}: {line.strip()[:120]}")
  assert not hits, (
    "references to notes outside the repository; write the reason here instead "
    "(docs/fidelity.md):\n" + "\n".join(hits)
  )
