"""sslx's losses against the official PyTorch implementations (golden numbers, no torch needed here).

tests/fixtures/official_losses/golden.npz holds seeded inputs and the outputs of the official code on
them: DINOLoss (facebookresearch/dino 7c446df), iBOTLoss (bytedance/ibot da316d8), SERE's pixel and
channel self-relation losses with their grid alignment (MCG-NKU/SERE e20f37f) and MoCo v3's
contrastive_loss (facebookresearch/moco-v3 c349e6e), run single-process on CPU with torch 2.13.0.
tests/fixtures/official_losses/make_golden.py says exactly how it was made.

Tolerance: losses and centres agree to rtol 1e-5 / atol 1e-6 (float32 on both sides; the teacher
temperatures 0.04-0.07 turn one-ulp logit differences into ~1e-6 relative changes); the SERE grids,
which are plain coordinates, to atol 1e-6.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.data.overlap import batch_overlaps
from sslx.losses import dino, ibot, mocov3, sere
from sslx.schedules import epoch_linspace_schedule

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "official_losses" / "golden.npz"
RTOL, ATOL = 1e-5, 1e-6

# The configuration the fixture was made with (make_golden.py's DINO / IBOT / SERE / MOCO dicts).
STUDENT_TEMP = 0.1
DINO_CENTER_MOMENTUM = 0.9
IBOT_CENTER_MOMENTUM, IBOT_CENTER_MOMENTUM2 = 0.9, 0.8
SERE_CFG = dict(num_heads=4, grid_gg=4, grid_lg=3, temp_pixel=0.5, temp_channel=0.1)

# Jitted: one XLA program per loss compiles faster than dispatching every small op eagerly.
_dino_loss = jax.jit(dino.dino_loss, static_argnames=("student_temp",))
_patch_loss = jax.jit(ibot.ibot_patch_loss, static_argnames=("student_temp",))
_spatial = jax.jit(
  sere.sere_spatial_loss, static_argnames=("num_heads", "grid_gg", "grid_lg", "temps_on")
)
_channel = jax.jit(sere.sere_channel_loss, static_argnames=("temps_on",))


@pytest.fixture(scope="module")
def g():
  with np.load(GOLDEN) as data:
    return {k: data[k] for k in data.files}


def _close(got, want, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(
    np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol
  )


# ------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
  "prefix,warm,final",
  [
    ("dino.temp_schedule", 0.04, 0.07),
    ("ibot.temp_schedule", 0.04, 0.07),
    ("ibot.temp2_schedule", 0.05, 0.06),
  ],
)
def test_teacher_temperature_schedule_matches_official(g, prefix, warm, final):
  official = g[prefix]  # one entry per epoch (100 epochs, 30 of warm-up)
  steps_per_epoch = 7
  sched = epoch_linspace_schedule(warm, final, 30, steps_per_epoch)
  steps = np.arange(len(official)) * steps_per_epoch + 3  # a step inside each epoch
  _close(sched(jnp.asarray(steps)), official, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------ DINO


def test_dino_loss_and_center_two_steps(g):
  """Two consecutive DINOLoss calls (epochs 3 and 40) from a non-zero centre; sslx carries its own centre."""
  center = jnp.asarray(g["dino.center0"])
  for step in range(2):
    p = f"dino.step{step}."
    student, teacher = jnp.asarray(g[p + "student"]), jnp.asarray(g[p + "teacher"])  # [S|T, B, K]
    loss = _dino_loss(
      student, teacher, center, student_temp=STUDENT_TEMP, teacher_temp=float(g[p + "temp"])
    )
    _close(loss, g[p + "loss"])
    center = dino.update_center(center, teacher, momentum=DINO_CENTER_MOMENTUM)
    _close(center, g[p + "center"])


# ------------------------------------------------------------------------------------------------ iBOT


def test_ibot_cls_patch_losses_and_centers_two_steps(g):
  """iBOTLoss: [CLS] term = DINO's cross-view loss over globals + locals, patch term on the masked
  globals (one image without masked patches, one fully masked), both centres, two steps."""
  center = jnp.asarray(g["ibot.center0"])
  center2 = jnp.asarray(g["ibot.center2_0"])
  for step in range(2):
    p = f"ibot.step{step}."
    student_cls = jnp.concatenate(
      [g[p + "student_cls"], g[p + "student_local_cls"]], axis=0
    )  # [S, B, K]
    teacher_cls = jnp.asarray(g[p + "teacher_cls"])
    masks = g[p + "masks"]  # [T, B, h, w]
    masks = jnp.asarray(masks.reshape(masks.shape[:2] + (-1,)))  # row-major [T, B, N]
    cls = _dino_loss(
      student_cls, teacher_cls, center, student_temp=STUDENT_TEMP, teacher_temp=float(g[p + "temp"])
    )
    patch = _patch_loss(
      jnp.asarray(g[p + "student_patch"]),
      jnp.asarray(g[p + "teacher_patch"]),
      masks,
      center2,
      student_temp=STUDENT_TEMP,
      teacher_temp=float(g[p + "temp2"]),
    )
    _close(cls, g[p + "cls"])
    _close(patch, g[p + "patch"])
    _close(cls + patch, g[p + "loss"])
    center = dino.update_center(center, teacher_cls, momentum=IBOT_CENTER_MOMENTUM)
    center2 = ibot.update_patch_center(
      center2, jnp.asarray(g[p + "teacher_patch"]), momentum=IBOT_CENTER_MOMENTUM2
    )
    _close(center, g[p + "center"])
    _close(center2, g[p + "center2"])


# ------------------------------------------------------------------------------------------------ SERE


def _overlaps(g):
  return batch_overlaps(
    g["sere.global_boxes"], g["sere.global_flips"], g["sere.local_boxes"], g["sere.local_flips"]
  )


def _as_official_grid(rects, valid, size):
  """sslx's sampling points as the official grid_sample grid: 2 * point - 1, or -2 where no overlap."""
  pts = 2.0 * np.asarray(sere.grid_points(jnp.asarray(rects), size)) - 1.0
  return np.where(np.asarray(valid)[..., None, None], pts, -2.0)


def test_sere_grids_match_official_get_grid(g):
  ov = _overlaps(g)
  s_gg, s_lg = SERE_CFG["grid_gg"], SERE_CFG["grid_lg"]
  b = ov["gg_rects"].shape[0]
  # Global pair (crop 0, crop 1): [..., 0, :] in crop 0's coords (official gridq), [..., 1, :] in crop 1's.
  for side, key in ((0, "sere.grid_gg_q"), (1, "sere.grid_gg_k")):
    got = _as_official_grid(ov["gg_rects"][:, 0, 1, side], ov["gg_valid"][:, 0, 1], s_gg)
    _close(got, g[key].reshape(b, s_gg * s_gg, 2), rtol=0)
  # Local v vs global q: official lists are indexed [q, v]; sslx's rects [B, v, q].
  for side, key in ((0, "sere.grid_lg_local"), (1, "sere.grid_lg_global")):
    got = _as_official_grid(ov["lg_rects"][..., side, :], ov["lg_valid"], s_lg)  # [B, Nl, Ng, P, 2]
    want = g[key].transpose(2, 1, 0, 3, 4, 5).reshape(got.shape)
    _close(got, want, rtol=0)
  assert (
    not ov["gg_valid"][1, 0, 1] and not ov["lg_valid"][0, 0].any() and not ov["lg_valid"][0, 1, 0]
  )


def _sere_views(g, with_local):
  sg, tg = jnp.asarray(g["sere.student_global"]), jnp.asarray(g["sere.teacher_global"])
  return sg, tg, (jnp.asarray(g["sere.student_local"]) if with_local else None)


@pytest.mark.parametrize("with_local", [True, False], ids=["global+local", "global_only"])
def test_sere_spatial_loss_matches_official(g, with_local):
  ov = _overlaps(g)
  sg, tg, sl = _sere_views(g, with_local)
  loss, metrics = _spatial(
    sg,
    tg,
    sl,
    ov["gg_rects"],
    ov["gg_valid"],
    ov["lg_rects"] if with_local else None,
    ov["lg_valid"] if with_local else None,
    num_heads=SERE_CFG["num_heads"],
    grid_gg=SERE_CFG["grid_gg"],
    grid_lg=SERE_CFG["grid_lg"],
    temp=SERE_CFG["temp_pixel"],
    other_temp=1.0,
    temps_on="teacher",
  )
  _close(loss, g["sere.pixel" if with_local else "sere.pixel_gg"])
  _close(metrics["spatial_gg"], g["sere.pixel_gg"])


@pytest.mark.parametrize("with_local", [True, False], ids=["global+local", "global_only"])
def test_sere_channel_loss_matches_official(g, with_local):
  sg, tg, sl = _sere_views(g, with_local)
  loss, metrics = _channel(
    sg, tg, sl, temp=SERE_CFG["temp_channel"], other_temp=1.0, temps_on="teacher"
  )
  _close(loss, g["sere.channel" if with_local else "sere.channel_gg"])
  _close(metrics["channel_gg"], g["sere.channel_gg"])


# --------------------------------------------------------------------------------------------- MoCo v3


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_mocov3_contrastive_loss_matches_official(g, temperature):
  q1, q2, k1, k2 = (jnp.asarray(g[f"mocov3.{n}"]) for n in ("q1", "q2", "k1", "k2"))
  _close(mocov3.infonce(q1, k2, temperature), g[f"mocov3.T{temperature}.ctr_q1_k2"])
  _close(mocov3.mocov3_loss(q1, q2, k1, k2, temperature), g[f"mocov3.T{temperature}.loss"])
