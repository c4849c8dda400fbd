"""iBOT and MoCo v3 as methods: masking semantics, DINO equivalence, teacher and frozen parts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.config_check import load_config_file
from sslx.data import augment, pipeline
from sslx.methods import Dino, Ibot, MocoV3, make_method
from sslx.methods.ibot import drop_mask_token
from sslx.methods.mocov3 import MocoConfigError
from sslx.train import sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name, **updates):
  c = load_config_file(os.path.join(ROOT, f"configs/{name}.py:smoke"))
  with c.unlocked():
    for k, v in updates.items():
      c[k] = v
  return c


def _views(c, batch_size=4):
  it = iter(
    pipeline.train_dataset(c.data, seed=0, batch_size=batch_size, patch_size=c.model.patch_size)
  )
  host = next(it)
  it.close()
  g, l = jax.jit(lambda r, g, l: augment.augment_multicrop(r, g, l, c.augment))(
    jax.random.PRNGKey(1), host["global_crops"], host["local_crops"]
  )
  return {
    **{k: jnp.asarray(v) for k, v in host.items() if k not in ("label", "index")},
    "global": g,
    "local": l,
  }


SCHED = {
  "teacher_temp": jnp.float32(0.04),
  "teacher_patch_temp": jnp.float32(0.07),
  "step": jnp.int32(0),
}


@pytest.fixture(scope="module")
def ibot_setup():
  c = _config("ibot")
  method = Ibot(c)
  params, state = method.init(jax.random.PRNGKey(0), (28, 28, 3))
  # A non-zero mask token, as after training: masking must show in the outputs.
  params["backbone"]["mask_token"] = params["backbone"]["mask_token"] + 0.5
  return c, method, params, state, _views(c)


def test_ibot_without_masks_is_dino_with_the_ibot_head(ibot_setup):
  c, method, params, state, views = ibot_setup
  views = {**views, "global_masks": jnp.zeros_like(views["global_masks"])}
  rng = jax.random.PRNGKey(3)
  teacher = drop_mask_token(params)
  loss_i, (state_i, m_i) = jax.jit(method.loss)(params, teacher, state, views, rng, SCHED)
  dc = _config("dino")
  with dc.unlocked():
    dc.head.norm_last_layer = c.head.norm_last_layer
  loss_d, (state_d, _) = jax.jit(Dino(dc).loss)(
    teacher, teacher, {"center": state["center"]}, views, rng, SCHED
  )
  assert float(m_i["loss_patch"]) == 0.0
  np.testing.assert_allclose(loss_i, loss_d, rtol=1e-6)
  np.testing.assert_allclose(state_i["center"], state_d["center"], rtol=1e-5, atol=1e-8)


def test_masks_reach_only_the_student_global_crops(ibot_setup):
  _, method, params, _, views = ibot_setup
  assert bool(views["global_masks"].any())
  teacher = drop_mask_token(params)
  fwd = jax.jit(method.forward)
  rng = jax.random.PRNGKey(3)
  masked = fwd(params, teacher, views, rng)
  plain = fwd(
    params, teacher, {**views, "global_masks": jnp.zeros_like(views["global_masks"])}, rng
  )
  np.testing.assert_array_equal(masked["teacher_logits"], plain["teacher_logits"])
  np.testing.assert_array_equal(masked["teacher_patch"], plain["teacher_patch"])
  ng = views["global"].shape[1]
  np.testing.assert_array_equal(masked["student_logits"][ng:], plain["student_logits"][ng:])
  assert float(jnp.abs(masked["student_logits"][:ng] - plain["student_logits"][:ng]).max()) > 0
  # SERE reads the student's global backbone outputs: those of the masked views.
  assert (
    float(jnp.abs(masked["student_global"]["prenorm"] - plain["student_global"]["prenorm"]).max())
    > 0
  )


def test_ibot_teacher_has_no_mask_token_and_sere_wraps_ibot():
  c = _config("sere_ibot")
  method = make_method(c)
  params, _ = method.init(jax.random.PRNGKey(0), (28, 28, 3))
  teacher = method.teacher_params(params)
  assert "mask_token" in params["backbone"] and "mask_token" not in teacher["backbone"]
  assert "sere_global" in teacher


def test_mocov3_teacher_is_backbone_and_projector_and_patch_embed_stays_fixed():
  c = _config("mocov3")
  mesh = sharding.make_mesh(c.mesh)
  built = trainer.build(c, mesh, steps_per_epoch=10, total_steps=10)
  state = built.init(0)
  assert sorted(state.params) == ["backbone", "predictor", "projector"]
  assert sorted(state.teacher_params) == ["backbone", "projector"]
  before = jax.device_get(state.params)
  views = _views(c, batch_size=16)
  batch = {k: v for k, v in views.items() if k in trainer.DEVICE_KEYS}
  state, metrics = built.train_step(state, batch)
  after = jax.device_get(state.params)
  assert np.isfinite(float(metrics["loss"]))
  for leaf in ("kernel", "bias"):  # frozen random patch embedding: no step, no decay
    np.testing.assert_array_equal(
      after["backbone"]["patch_embed"][leaf], before["backbone"]["patch_embed"][leaf]
    )
  assert not np.array_equal(after["backbone"]["cls_token"], before["backbone"]["cls_token"])
  assert not np.array_equal(
    after["predictor"]["linear_0"]["kernel"], before["predictor"]["linear_0"]["kernel"]
  )


def test_mocov3_rejects_local_crops():
  c = _config("mocov3")
  with c.unlocked():
    c.data.local_crops.number = 2
  with pytest.raises(MocoConfigError, match="local_crops.number=0"):
    MocoV3(c).init(jax.random.PRNGKey(0), (28, 28, 3))
