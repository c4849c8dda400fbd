"""The CAE method: exact mask counts, stop-gradient target, decay mask, token targets, smoke run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sslx.config_check import load_config_file
from sslx.data import augment, masks, pipeline
from sslx.errors import UserError
from sslx.losses import cae as cae_losses
from sslx.methods import METHODS, make_method
from sslx.methods.cae import Cae, CaeConfigError, MaskCountError, cae_decay_mask
from sslx.models import cae as cae_model
from sslx.models import dalle
from sslx.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(preset="smoke", **cae):
  c = load_config_file(os.path.join(ROOT, f"configs/cae.py:{preset}"))
  with c.unlocked():
    c.cae.update(**cae)
  return c


@pytest.fixture(scope="module")
def views():
  c = _config()
  it = iter(pipeline.train_dataset(c.data, seed=0, batch_size=4, patch_size=4))
  host = next(it)
  it.close()
  g, l = jax.jit(lambda r, g, l: augment.augment_multicrop(r, g, l, c.augment))(
    jax.random.PRNGKey(1), host["global_crops"], host["local_crops"]
  )
  return {"global": g, "local": l, "global_masks": jnp.asarray(host["global_masks"])}


def _init(method):
  return jax.jit(lambda r: method.init(r, (28, 28, 3)))(jax.random.PRNGKey(0))


def test_exactly_the_requested_number_of_patches_is_masked(views):
  assert views["global_masks"].shape == (4, 1, 7, 7)
  np.testing.assert_array_equal(views["global_masks"].sum((2, 3)), 24)
  # The ViT-B/16 recipe: 98 of 196, every draw.
  spec = masks.MaskSpec.from_config(_config("").data.masks)
  rng = np.random.default_rng(0)
  assert {int(spec.draw(rng, (14, 14)).sum()) for _ in range(30)} == {98}


def test_alignment_target_is_stop_gradient_of_the_current_encoder(views):
  method = make_method(_config())
  params, loss_state = _init(method)
  net = method.network()
  images = views["global"][:, 0]
  vis, msk = cae_model.split_by_mask(views["global_masks"][:, 0].reshape(4, -1), 24)
  target_patches = cae_model.gather_tokens(cae_losses.patchify(images, 4), msk)
  const_target = jax.jit(
    lambda p: net.apply({"params": p}, images, msk, train=True, method=cae_model.CAE.align_target)
  )(params)

  def by_hand(p, target_fn):
    out = net.apply({"params": p}, images, vis, msk, train=True)
    align = jnp.mean(jnp.square(out["latent_pred"] - target_fn(p)))
    return cae_losses.pixel_loss(out["pred"], target_patches) + 2.0 * align

  through_target = lambda p: net.apply(
    {"params": p},
    images,
    msk,
    train=True,  # noqa: E731
    method=cae_model.CAE.align_target,
  )

  @jax.jit
  def grads(p):
    got = jax.grad(lambda q: method.loss(q, q, loss_state, views, jax.random.PRNGKey(3), {})[0])(p)
    want = jax.grad(lambda q: by_hand(q, lambda _: const_target))(p)
    wrong = jax.grad(lambda q: by_hand(q, through_target))(p)
    return got, want, wrong

  got, want, wrong = grads(params)
  close = lambda a, b: all(
    np.allclose(x, y, rtol=1e-4, atol=1e-6)  # noqa: E731
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  assert close(got, want)
  assert not close(got, wrong)  # gradient through the target would change the encoder's grads
  # The decoder and regressor get gradients; so does the encoder (through the visible path).
  assert float(jnp.abs(got["encoder"]["cls_token"]).sum()) > 0


def test_a_batch_with_the_wrong_mask_count_fails_clearly(views):
  # Checked on the host before the batch is sent (the trainer's check_batch hook); a UserError,
  # so main.py prints it as one line.
  method = make_method(_config())
  good = np.asarray(views["global_masks"])
  method.check_batch({"global_masks": good})
  bad = np.zeros_like(good)
  bad[:, :, :3] = True
  with pytest.raises(MaskCountError, match="exactly 24 masked patches") as e:
    method.check_batch({"global_masks": bad})
  assert isinstance(e.value, UserError)


def test_weight_decay_covers_cls_and_mask_tokens_not_biases_or_scales():
  method = make_method(_config())
  params, _ = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), (28, 28, 3)))
  m = cae_decay_mask(params)
  assert m["encoder"]["cls_token"] and m["regressor"]["mask_token"]
  assert m["encoder"]["block_0"]["attn"]["qkv"]["kernel"] and m["encoder"]["patch_embed"]["kernel"]
  assert not m["encoder"]["block_0"]["attn"]["proj"]["bias"]
  assert not m["encoder"]["block_0"]["attn"]["q_bias"] and not m["encoder"]["block_0"]["gamma_1"]
  assert not m["encoder"]["norm"]["scale"]


@pytest.mark.parametrize(
  "edit, match",
  [
    (lambda c: c.data.masks.update(exact=False), "exact=True"),
    (lambda c: c.data.global_crops.update(number=2), "global_crops.number=1"),
    (lambda c: c.cae.update(target="rgb"), "config.cae.target"),
    (lambda c: c.data.masks.update(num_masked=49), "num_masked=49"),
  ],
)
def test_bad_configs_name_the_key(edit, match):
  c = _config()
  with c.unlocked():
    edit(c)
  with pytest.raises(CaeConfigError, match=match):
    Cae(c)


def test_token_targets_with_a_synthetic_tokenizer(tmp_path, views):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "tok.npz")
  np.savez(
    path,
    **{
      k: rng.normal(size=s).astype(np.float32) * 0.1
      for k, s in dalle.expected_shapes(8, 1, 3, 16).items()
    },
  )
  method = make_method(
    _config(target="tokens", tokenizer_path=path, vocab_size=16, tokenizer_size=56)
  )
  params, loss_state = _init(method)
  assert params["decoder"]["head"]["kernel"].shape[-1] == 16
  loss, (new_state, metrics) = jax.jit(
    lambda p, s: method.loss(p, p, s, views, jax.random.PRNGKey(0), {})
  )(params, loss_state)
  assert np.isfinite(float(loss)) and 0 <= float(metrics["token_acc"]) <= 1
  assert float(metrics["loss_recon"]) > 0 and float(loss) > float(metrics["loss_recon"])
  ids = jax.jit(method.token_ids)(loss_state["tokenizer"], views["global"][:, 0])
  assert ids.shape == (4, 49) and 0 <= int(ids.min()) and int(ids.max()) < 16
  # The tokenizer stays frozen in the loss state.
  np.testing.assert_array_equal(
    new_state["tokenizer"]["input"]["w"], loss_state["tokenizer"]["input"]["w"]
  )
  with pytest.raises(CaeConfigError, match="vocab_size"):
    make_method(_config(target="tokens", tokenizer_path=path, vocab_size=32)).init(
      jax.random.PRNGKey(0), (28, 28, 3)
    )


class CaeWithCopiedTeacher(Cae):
  """CAE as it was before it dropped its teacher: an 'EMA' teacher at momentum 0 (a copy of the
  student after every step) that the loss never reads."""

  has_teacher = True


def test_smoke_preset_keeps_no_teacher_copy_and_trains_as_with_one(tmp_path, monkeypatch):
  results = trainer.run(_config(), str(tmp_path / "new"))
  assert results["step"] == 6
  with ocp.CheckpointManager(str(tmp_path / "new" / "checkpoints")) as mgr:
    state = mgr.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  assert not jax.tree.leaves(state.get("teacher_params"))  # no second copy of the parameters
  assert jax.tree.leaves(state["params"])
  # The same run with the old momentum-0 teacher copy: identical losses and parameters.
  monkeypatch.setitem(METHODS, "cae_with_teacher", CaeWithCopiedTeacher)
  old = _config()
  with old.unlocked():
    old.method = "cae_with_teacher"
  trainer.run(old, str(tmp_path / "old"))

  def losses(name):
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

  assert losses("new") == losses("old") and len(losses("new")) >= 2
  with ocp.CheckpointManager(str(tmp_path / "old" / "checkpoints")) as mgr:
    was = mgr.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(was["params"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(was["params"]), jax.tree.leaves(was["teacher_params"])):
    np.testing.assert_array_equal(a, b)  # the old copy was the student itself


def test_presets_load_and_the_default_is_the_official_recipe():
  for preset in ("", "vit_small", "fashion_mnist", "smoke"):
    c = _config(preset)
    assert c.method == "cae" and c.teacher.momentum == 0.0 == c.teacher.momentum_end
    Cae(c)  # validates masks / views / target
  c = _config("")
  assert (c.batch_size, c.total_epochs, c.optim.lr, c.optim.warmup_epochs) == (
    2048,
    300,
    1.5e-3,
    10.0,
  )
  assert (c.optim.weight_decay, c.optim.clip_grad, c.optim.min_lr) == (0.05, 3.0, 1e-5)
  assert (c.model.variant, c.model.patch_size, c.model.drop_path_rate, c.model.init_values) == (
    "base",
    16,
    0.1,
    0.1,
  )
  assert (c.model.regressor_depth, c.model.decoder_depth, c.cae.align_weight) == (4, 4, 2.0)
  assert (c.data.masks.num_masked, c.data.masks.min_area, c.data.global_crops.size) == (98, 16, 224)
  assert tuple(c.data.global_crops.scale) == (0.08, 1.0) and c.augment.color_jitter_prob == 0.0
  # cae_small_patch16_224: 12 heads; run_pretraining.py's decoder defaults 768 wide, 12 heads.
  net = Cae(_config("vit_small")).network()
  assert (net.embed_dim, net.num_heads, net.decoder_embed_dim, net.decoder_num_heads) == (
    384,
    12,
    768,
    12,
  )


def test_lr_schedule_is_absolute_with_warmup_then_cosine_to_min_lr():
  c = _config("")
  _, scheds = Cae(c).optimizer(None, steps_per_epoch=10, total_steps=3000)
  lr = lambda s: float(scheds["lr"](s))  # noqa: E731
  assert lr(0) == 0.0 and lr(99) == pytest.approx(1.5e-3)  # 10 warm-up epochs, not batch-scaled
  assert lr(2999) == pytest.approx(1e-5, rel=1e-2) and float(
    scheds["weight_decay"](2000)
  ) == pytest.approx(0.05)
