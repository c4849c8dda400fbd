"""Standalone evaluations of a workdir's teacher: kNN, linear probe, attentive probe.

`main.py --mode=linear_probe|attentive_probe [--random_init | --init_from=FILE]` lands here (and
`--mode=knn` with either flag). Like `trainer.evaluate_workdir` it restores only the teacher
parameters of the latest checkpoint; `random_init=True` evaluates the method's freshly
initialised parameters instead (the baseline rows of RESULTS), `init_from` those parameters with
the file's backbone (sslx/models/init_from.py). `config.probe.protocol='dino'` makes the linear
probe DINO's protocol (`method.block_features`, fresh crops every epoch). Works for any method through its interface
(sslx/methods/base.py): the feature is `method.features`, the attentive probe's tokens
`method.tokens`, both on `evaluated_params`. Single process (probes cache features on the host).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sslx.data import pipeline
from sslx.eval import knn, probe
from sslx.methods import make_method
from sslx.methods.base import evaluated_params
from sslx.train import checkpoint as ckpt_lib

MODES = ("knn", "linear_probe", "attentive_probe")


def _on_uint8(fn: Callable, params: Any, config: ml_collections.ConfigDict) -> Callable:
  jitted = knn.eval_forward(fn, tuple(config.augment.mean), tuple(config.augment.std))
  return lambda images: np.asarray(jitted(params, jnp.asarray(images)))


def teacher_of(
  config: ml_collections.ConfigDict,
  workdir: str,
  method: Any,
  random_init: bool,
  init_from: str | None = None,
  init_from_key: str = "auto",
) -> tuple[int, Any]:
  """(step, what `method.features` takes) of the latest checkpoint, or (0, the same at init)
  with random_init: the teacher's parameters (the student's for a method without a teacher)
  through the method's `eval_params` (e.g. BatchNorm statistics). With `init_from` (a file,
  sslx/models/init_from.py) the initial parameters get its backbone, and no checkpoint is read."""
  if random_init or init_from:
    size = config.data.global_crops.size
    # The same draw as the trainer's step-0 state (trainer.build: split(seed) -> init key).
    r_init, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    params, loss_state = jax.jit(lambda r: method.init(r, (size, size, 3)))(r_init)
    if init_from:
      from sslx.models import init_from as init_from_lib

      params, loss_state, _ = init_from_lib.init_params(
        method, jax.device_get(params), jax.device_get(loss_state), init_from, init_from_key
      )
    teacher = method.teacher_params(params) if method.has_teacher else None
    return 0, evaluated_params(
      method, {"params": params, "teacher_params": teacher, "loss_state": loss_state}
    )
  teacher_key = "teacher_params" if method.has_teacher else "params"
  step, parts = ckpt_lib.read_latest(workdir, (teacher_key, "loss_state"))
  return step, evaluated_params(method, parts)


def _protocol(pc: Any) -> str:
  """config.probe.protocol: 'cached' (default: features once, BN + Linear) or 'dino'."""
  name = str(pc.get("protocol", "cached")) if pc else "cached"
  if name not in probe.PROTOCOLS:
    raise probe.ProbeError(f"config.probe.protocol={name!r}; valid: {', '.join(probe.PROTOCOLS)}")
  return name


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  mode: str,
  random_init: bool = False,
  init_from: str | None = None,
  init_from_key: str = "auto",
) -> dict[str, Any]:
  """Runs `mode` ('knn' | 'linear_probe' | 'attentive_probe') on the workdir's teacher, or on
  the weights of the file `init_from` (no checkpoint needed)."""
  if mode not in MODES:
    raise ValueError(f"mode {mode!r}; valid: {MODES}")
  if random_init and init_from:
    raise probe.ProbeError("--random_init and --init_from exclude each other; drop one")
  method = make_method(config)
  step, teacher = teacher_of(config, workdir, method, random_init, init_from, init_from_key)
  dc, ec = config.data, config.eval
  batches = lambda split: pipeline.eval_dataset(dc, split, batch_size=ec.batch_size)  # noqa: E731
  classes = pipeline.eval_num_classes(dc)
  features = _on_uint8(method.features, teacher, config)
  res: dict[str, Any]
  pc = config.get("probe") or {}
  seed = int(pc.get("seed", 0)) if pc else 0
  max_train = int(pc.get("max_train", 0)) if pc else 0
  max_test = int(pc.get("max_test", 0)) if pc else 0
  if mode == "knn":
    res = knn.run_knn(
      features,
      batches(dc.eval_train_split),
      batches(dc.eval_test_split),
      num_classes=classes,
      k=ec.knn_k,
      temperature=ec.knn_temperature,
    )
  elif mode == "linear_probe" and _protocol(pc) == "dino":
    dino = probe.DinoLinearSettings.from_config(pc.get("dino"), seed)
    n, pool = dino.n_last_blocks, dino.avgpool
    blocks = _on_uint8(lambda p, images: method.block_features(p, images, n, pool), teacher, config)

    def progress(epoch: int, loss: float) -> None:
      logging.info("linear_probe (dino) epoch %d/%d: loss %.4f", epoch + 1, dino.epochs, loss)

    res = {"protocol": "dino"}
    res |= probe.dino_linear_probe(
      blocks,
      batches(dc.eval_train_split),
      batches(dc.eval_test_split),
      num_classes=classes,
      settings=dino,
      max_train=max_train,
      max_test=max_test,
      on_epoch=progress,
    )
  elif mode == "linear_probe":
    settings = probe.ProbeSettings.from_config(pc.get("linear") if pc else None, seed)
    res = probe.linear_probe(
      features,
      batches(dc.eval_train_split),
      batches(dc.eval_test_split),
      num_classes=classes,
      settings=settings,
      max_train=max_train,
      max_test=max_test,
    )
  else:
    settings = probe.ProbeSettings.from_config(pc.get("attentive") if pc else None, seed)
    tokens = _on_uint8(method.tokens, teacher, config)
    res = probe.attentive_probe(
      tokens,
      batches(dc.eval_train_split),
      batches(dc.eval_test_split),
      num_classes=classes,
      settings=settings,
      max_train=max_train,
      max_test=max_test,
    )
  what = (
    "random init" if random_init else (f"init_from {init_from}" if init_from else f"step {step}")
  )
  logging.info("%s %s: top-1 %.2f%% top-5 %.2f%%", mode, what, res["top1"], res["top5"])
  out: dict[str, Any] = {"step": step, "random_init": random_init, **res}
  if init_from:
    out["init_from"] = init_from
  return out
