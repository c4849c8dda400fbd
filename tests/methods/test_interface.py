"""The method interface: registration refuses an incomplete method with one line naming the gap."""

import pytest

from sslx.methods import METHODS, Dino, register
from sslx.methods.accumulation import LossStateRule
from sslx.methods.base import Method, MethodInterfaceError


class NoFeatures(Method):
  loss_state_rule = LossStateRule.MEAN

  def init(self, rng, image_shape):
    return {}, {}

  def loss(self, params, teacher_params, loss_state, views, rng, sched):
    return 0.0, (loss_state, {})


class NoRule(NoFeatures):
  loss_state_rule = None

  def features(self, eval_params, images):
    return images


class OtherDino(Dino):
  """A complete method that may not take a name already in use."""


def test_a_missing_required_piece_fails_at_registration_naming_it():
  with pytest.raises(
    MethodInterfaceError,
    match=r"method 'x' \(NoFeatures\) does not implement: "
    r"features$",
  ):
    register("x", NoFeatures)
  with pytest.raises(MethodInterfaceError, match="does not declare loss_state_rule"):
    register("x", NoRule)
  with pytest.raises(MethodInterfaceError, match="must derive from sslx.methods.base.Method"):
    register("x", dict)
  with pytest.raises(MethodInterfaceError, match="already registered"):
    register("dino", OtherDino)
  assert "x" not in METHODS and METHODS["dino"] is Dino


def test_every_registered_method_implements_the_interface():
  assert set(METHODS) == {"dino", "ibot", "mocov3", "cae", "byol", "sage", "finetune"}
  for cls in METHODS.values():
    assert issubclass(cls, Method) and isinstance(cls.loss_state_rule, LossStateRule)
