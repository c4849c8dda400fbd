"""The methods the trainer can run, and the add-ons that wrap them.

One registration per method: `register(name, cls)` checks that `cls` implements the interface of
sslx/methods/base.py (a missing piece is a one-line `MethodInterfaceError` naming it) and makes
`config.method = name` select it. Everything else (trainer, evaluation modes, export, attention
pictures) reads the interface. Add-ons (`ADDONS`, applied in this order) wrap whichever method
runs when their config block says `enabled=True`; adding one never changes the base method's
initial parameters or its data.
"""

from __future__ import annotations

from sslx.errors import UserError
from sslx.methods.base import AddOn, Method, MethodInterfaceError, check_method_class
from sslx.methods.byol import Byol
from sslx.methods.cae import Cae
from sslx.methods.dino import Dino
from sslx.methods.finetune import Finetune
from sslx.methods.ibot import Ibot
from sslx.methods.koleo import WithKoLeo
from sslx.methods.mocov3 import MocoV3
from sslx.methods.sage import Sage
from sslx.methods.sere import WithSere

__all__ = [
  "ADDONS",
  "METHODS",
  "AddOn",
  "Method",
  "MethodInterfaceError",
  "make_method",
  "register",
]

METHODS: dict[str, type[Method]] = {}
# Loss add-ons in the order they wrap: config.<name>.enabled switches each on.
ADDONS: tuple[type[AddOn], ...] = (WithSere, WithKoLeo)


def register(name: str, cls: type[Method]) -> type[Method]:
  """Makes `config.method = name` run `cls`, after checking it implements the interface."""
  check_method_class(name, cls)
  if name in METHODS and METHODS[name] is not cls:
    raise MethodInterfaceError(f"method {name!r} is already registered ({METHODS[name].__name__})")
  METHODS[name] = cls
  return cls


for _name, _cls in (
  ("dino", Dino),
  ("ibot", Ibot),
  ("mocov3", MocoV3),
  ("cae", Cae),
  ("byol", Byol),
  ("sage", Sage),
  ("finetune", Finetune),
):
  register(_name, _cls)


class UnknownMethodError(UserError):
  """config.method names no method."""


def enabled_addons(config) -> list[str]:
  """Names of the add-ons `config` switches on, in wrapping order."""
  return [a.name for a in ADDONS if config.get(a.name) is not None and config[a.name].enabled]


def make_method(config) -> Method:
  """The method object for `config`, wrapped by every enabled add-on."""
  if config.method not in METHODS:
    raise UnknownMethodError(
      f"config.method={config.method!r} is not a method; valid: {', '.join(sorted(METHODS))}"
    )
  method: Method = METHODS[config.method](config)
  for addon in ADDONS:
    if addon.name in enabled_addons(config):
      method = addon(method, config)
  return method
