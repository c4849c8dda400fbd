"""sslx's CAE / BYOL / SaGe losses against the official code (golden numbers, no torch or paddle needed here).

tests/fixtures/official_losses/golden_cae_byol_sage.npz holds seeded inputs and what the official code
computed from them: CAE's token + alignment loss as `furnace/engine_for_pretraining.py:train_one_epoch`
computes it (Atten4Vis/CAE a7fd162), CAE's pixel-target variant from the authors' Paddle port
(PaddlePaddle/VIMER aff5d4a, `CAE/packages/engine_for_pretraining.py`, target_mode 'rgb'), BYOL's
regression loss (LatentPredictHead) and SaGe's whole loss dict from `SaGe_Net.forward_train` summed by
`parse_losses` (sunsmarterjie/SaGe 1bc5873); torch 2.13.0 / paddle 3.3.1, CPU, float32.
tests/fixtures/official_losses/make_golden_cae_byol_sage.py says exactly how it was made.

The loss weights come from sslx's recipes (configs/cae.py, configs/sage.py), so the test also checks
that they are the official ones.

Tolerance: rtol 1e-5, atol 1e-7 (float32 on both sides; the sums over ~3e5 image elements and the
different reduction orders of XLA / torch / paddle stay well inside it).
"""

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sslx.config_check import load_config_file
from sslx.losses import byol, cae, sage
from sslx.models import cae as cae_model

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "official_losses" / "golden_cae_byol_sage.npz"
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def recipe():
  """The default (paper / release) configs' loss weights."""
  c_cae = load_config_file(os.path.join(ROOT, "configs/cae.py"))
  c_sage = load_config_file(os.path.join(ROOT, "configs/sage.py"))
  return {
    "cae_align": float(c_cae.cae.align_weight),
    "sage_lambda": float(c_sage.sage.weight),
    "sage_weights": {k: float(v) for k, v in c_sage.sage.weights.items()},
  }


@pytest.fixture(scope="module")
def g():
  with np.load(GOLDEN) as data:
    return {k: data[k] for k in data.files}


def _close(got, want, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(
    np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol
  )


def _mask_indices(masks):
  """Official bool masks [B, h, w] -> sslx's (visible, masked) row-major index arrays."""
  flat = masks.reshape(masks.shape[0], -1)
  num_masked = int(flat.sum(1)[0])
  assert (flat.sum(1) == num_masked).all()
  return cae_model.split_by_mask(jnp.asarray(flat), num_masked)


def _nhwc(x):
  return jnp.asarray(np.moveaxis(x, -3, -1))


# ------------------------------------------------------------------------------------------------- CAE


def test_cae_token_and_alignment_loss_matches_official(g, recipe):
  """Atten4Vis/CAE: CE(decoder logits, DALL-E ids of the masked patches) + 2 * MSE(latent_pred, target)."""
  _, mask_idx = _mask_indices(g["cae_tok.masks"])
  ids = jnp.asarray(g["cae_tok.ids"].reshape(len(mask_idx), -1))
  ids = jnp.take_along_axis(ids, mask_idx, axis=1)  # what train_one_epoch's labels hold
  logits = jnp.asarray(g["cae_tok.logits"])  # [B, Nm, V], masked patches ascending
  recon = cae.token_loss(logits, ids)
  align = cae.alignment_loss(
    jnp.asarray(g["cae_tok.latent_pred"]), jnp.asarray(g["cae_tok.latent_target"])
  )
  weight = recipe["cae_align"]
  assert (
    weight == float(g["cae_tok.align_loss_weight"]) == 2.0
  )  # --align_loss_weight 2 (scripts, default)
  _close(recon, g["cae_tok.loss_main"])
  _close(weight * align, g["cae_tok.loss_align"])
  _close(cae.cae_loss(recon, align, weight), g["cae_tok.loss"])
  _close(cae.cae_loss(recon, align), g["cae_tok.loss"])  # the function's default weight too
  _close(jnp.mean(jnp.argmax(logits, -1) == ids), g["cae_tok.mlm_acc"])


def _cae_pixel_terms(g, weight):
  _, mask_idx = _mask_indices(g["cae_pix.masks"])
  patches = cae.patchify(_nhwc(g["cae_pix.samples"]), int(g["cae_pix.patch_size"]))
  recon = cae.pixel_loss(jnp.asarray(g["cae_pix.pred"]), cae_model.gather_tokens(patches, mask_idx))
  align = cae.alignment_loss(
    jnp.asarray(g["cae_pix.latent"]), jnp.asarray(g["cae_pix.latent_target"])
  )
  assert weight == float(g["cae_pix.dual_loss_weight"])  # VIMER README: --dual_loss_weight 2
  return recon, align, weight


def test_cae_pixel_loss_matches_vimer_layernorm_target(g, recipe):
  """VIMER CAE `--target_mode rgb` with its default `--normalized_pixel layernorm` (3 x 4 grid of 4-px
  patches, (ph, pw, c) order, one low-contrast image) + dual_loss_weight 2 * MSE alignment."""
  recon, align, weight = _cae_pixel_terms(g, recipe["cae_align"])
  _close(recon, g["cae_pix.layernorm.loss_main"])
  _close(weight * align, g["cae_pix.layernorm.loss_aux"])
  _close(cae.cae_loss(recon, align, weight), g["cae_pix.layernorm.loss"])


@pytest.mark.xfail(
  strict=True,
  reason=(
    "VIMER's non-default `--normalized_pixel patch` divides by sqrt(var + 1e-6) with paddle's *unbiased* "
    "variance (Tensor.var default; MAE's norm_pix_loss likewise uses torch's unbiased var); sslx implements "
    "the default 'layernorm' target, i.e. the biased variance. Over P = 48 pixel values the two targets "
    "differ by sqrt(48/47) in scale (MSE 2.0574 vs 2.0359 here)."
  ),
)
def test_cae_pixel_loss_vimer_patch_mode_is_a_different_target(g, recipe):
  recon, _, _ = _cae_pixel_terms(g, recipe["cae_align"])
  _close(recon, g["cae_pix.patch.loss_main"])


# ------------------------------------------------------------------------------------------------ BYOL


def test_byol_regression_loss_matches_latent_predict_head(g):
  """LatentPredictHead(size_average=True): 2 - 2 mean cos, summed over both directions; rows of norms
  1e-3 .. 1e3 and one all-zero prediction (F.normalize's eps clamp: cos 0, loss 2)."""
  q1, q2, z1, z2 = (jnp.asarray(g[f"byol.{k}"]) for k in ("q1", "q2", "z1", "z2"))
  _close(byol.regression_loss(q1, z2), g["byol.loss_q1_z2"])
  _close(byol.regression_loss(q2, z1), g["byol.loss_q2_z1"])
  _close(byol.byol_loss(q1, q2, z1, z2), g["byol.loss"])


# ------------------------------------------------------------------------------------------------ SaGe

OFFICIAL_TERM = {
  "pixel": "loss_mse",
  "proj": "loss_f1",
  "c5": "loss_f7",
  "c4": "loss_f14",
  "c3": "loss_f28",
}


def test_sage_loss_matches_official_forward_train(g, recipe):
  """SaGe_Net.forward_train's loss dict (BYOL loss1 + pixel MSE / 10 + evaluator proj / 10 and c5, c4, c3
  / 30, each summed over both views; c2 given but unused) and parse_losses' total."""
  weights, lam = recipe["sage_weights"], recipe["sage_lambda"]
  assert set(weights) == set(OFFICIAL_TERM) and lam == 1.0
  weighted = {k: 0.0 for k in OFFICIAL_TERM}
  gen = 0.0
  for v in range(2):
    image, recon = _nhwc(g["sage.img"][:, v]), _nhwc(g["sage.recon"][:, v])
    feats = {}
    for kind, key in (("real", f"real{v + 1}"), ("fake", f"recon{v + 1}")):
      feats[kind] = {
        lvl: (
          _nhwc(g[f"sage.feat.{key}.{lvl}"])
          if lvl != "proj"
          else jnp.asarray(g[f"sage.feat.{key}.{lvl}"])
        )
        for lvl in ("c3", "c4", "c5", "proj")
      }
    total, terms = sage.generation_loss(image, recon, feats["real"], feats["fake"], weights)
    gen = gen + total
    for k, t in terms.items():
      weighted[k] = weighted[k] + weights[k] * t
  for k, official in OFFICIAL_TERM.items():
    _close(weighted[k], g["sage." + official])
  # The predictor is the identity in the fixture, so the online projections are BYOL's predictions.
  on1, on2, tg1, tg2 = (
    jnp.asarray(g[f"sage.{k}"])
    for k in ("online_proj1", "online_proj2", "target_proj1", "target_proj2")
  )
  byol_loss = byol.byol_loss(on1, on2, tg1, tg2)
  _close(byol_loss, g["sage.loss1"])
  _close(byol_loss + lam * gen, g["sage.total"])
