"""`main.py --mode=attention`: the teacher's last-layer [CLS] attention, per head, as a picture.

DINO's best-known figure (its `visualize_attention.py`) for any sslx workdir whose teacher is a
ViT with a [CLS] token (DINO, iBOT, MoCo v3, with or without SERE; CAE's encoder). Writes
`<workdir>/attention/<teacher_step<N>|random_init>.png` (a row per image: the image, each head's
map on the 'hot' ramp, the image with the patches outside the head-mean map's top-`keep` mass
dimmed) and a `.npz` beside it with the images, maps and masks, and returns each head's mean
kept fraction (the share of patches holding `keep` of the mass: lower = more focused).

Images: the first `num_images` of the config's evaluation test split, or the image files named
by `images` (files and/or folders), both through the evaluation view (shorter side to
`data.eval_resize`, centre crop `data.eval_size`). The picture reuses `--random_init` for the
same network at its initial weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from sslx.data import crops as crops_lib
from sslx.data import pipeline, sources
from sslx.errors import UserError
from sslx.eval import attention as attention_lib
from sslx.eval import knn
from sslx.methods import make_method
from sslx.train.probe_workdir import teacher_of

Forward = Callable[[Any, jax.Array], jax.Array]


class AttentionError(UserError):
  """The attention picture cannot be made as asked."""


def _image_paths(images: Sequence[str]) -> list[str]:
  paths = []
  for item in images:
    if os.path.isdir(item):
      paths.extend(sources.list_images(item))
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise AttentionError(f"--images: {item!r} is neither a file nor a folder")
  if not paths:
    raise AttentionError(f"--images: no image files in {list(images)}")
  return paths


def load_images(
  config: ml_collections.ConfigDict, num_images: int, images: Sequence[str] = ()
) -> tuple[np.ndarray, list[str]]:
  """(uint8 [B, S, S, 3] evaluation views, a name per image) from files or the test split."""
  dc = config.data
  resize, size = int(dc.eval_resize), int(dc.eval_size)
  if images:
    paths = _image_paths(images)[:num_images]
    views = []
    for path in paths:
      try:
        image, _, _ = sources.decode_image(path)
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise AttentionError(f"cannot read image {path}: {e}") from e
      views.append(crops_lib.resize_center_crop(image, resize, size, dc.interpolation))
    return np.stack(views), paths
  ds = pipeline.eval_dataset(dc, dc.eval_test_split, batch_size=num_images)
  batch = next(iter(ds))
  keep = batch["mask"]
  names = [f"{dc.eval_test_split}[{i}] label {int(l)}" for i, l in enumerate(batch["label"][keep])]
  return batch["image"][keep], names


def write_attention(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  num_images: int = 8,
  images: Sequence[str] = (),
  keep: float = 0.6,
  random_init: bool = False,
  scale: int | None = None,
) -> dict[str, Any]:
  """Writes the attention picture and maps of the workdir's teacher; returns what it wrote.

  Args:
    config: the run's config (the one the workdir was trained with).
    workdir: holds the checkpoint (not needed with ``random_init``).
    num_images: how many images (rows).
    images: image files or folders; empty = the evaluation test split.
    keep: mass share of DINO's thresholded mask (its `--threshold`, 0.6).
    random_init: the method's initial weights instead of the checkpoint's teacher.
    scale: panel magnification; default makes each panel at least 112 px.

  Returns:
    {'png', 'npz', 'step', 'random_init', 'images', 'heads', 'grid', 'kept_fraction' (per head,
    mean over images), 'keep'}.

  Raises:
    AttentionError: a method without a ViT [CLS] teacher (BYOL, SaGe), bad ``keep``/``num_images``, unreadable
      images. FileNotFoundError: no checkpoint in ``workdir``.
  """
  if num_images < 1:
    raise AttentionError(f"--num_images must be >= 1, got {num_images}")
  if not 0.0 < keep <= 1.0:
    raise AttentionError(f"--keep_mass must be in (0, 1], got {keep}")
  method = make_method(config)
  attention_fn, patch_size = method.attention()  # UnsupportedMode (one line) for a ResNet
  step, teacher = teacher_of(config, workdir, method, random_init)
  views, names = load_images(config, num_images, images)

  grid = (views.shape[1] // patch_size, views.shape[2] // patch_size)
  forward = knn.eval_forward(attention_fn, tuple(config.augment.mean), tuple(config.augment.std))
  att = np.asarray(jax.device_get(forward(teacher, jnp.asarray(views))))
  maps = attention_lib.cls_attention(att, grid)
  masks = attention_lib.mass_mask(maps, keep)
  scale = scale or max(1, -(-112 // views.shape[1]))
  picture = attention_lib.attention_figure(views, maps, keep=keep, scale=scale)

  out_dir = os.path.join(workdir, "attention")
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, "random_init" if random_init else f"teacher_step{step}")
  # Written under a temporary name and renamed, so a failed run leaves no half file.
  Image.fromarray(picture).save(stem + ".png.tmp", format="PNG")
  os.replace(stem + ".png.tmp", stem + ".png")
  with open(stem + ".npz.tmp", "wb") as f:
    np.savez_compressed(f, images=views, maps=maps, masks=masks, names=np.array(names))
  os.replace(stem + ".npz.tmp", stem + ".npz")
  fraction = masks.mean(axis=(-2, -1)).mean(axis=0)
  logging.info(
    "attention (%s): %d images, %d heads on a %dx%d grid; share of patches holding "
    "%.0f%% of each head's mass: %s -> %s.png",
    "random init" if random_init else f"step {step}",
    len(views),
    maps.shape[1],
    grid[0],
    grid[1],
    100 * keep,
    " ".join(f"{f:.3f}" for f in fraction),
    stem,
  )
  return {
    "png": stem + ".png",
    "npz": stem + ".npz",
    "step": step,
    "random_init": random_init,
    "images": len(views),
    "heads": int(maps.shape[1]),
    "grid": grid,
    "kept_fraction": [round(float(f), 4) for f in fraction],
    "keep": keep,
  }
