"""Self-supervised methods the trainer can run, by config name.

A plain dict: `config.method` picks the class; each class takes the run config.
Add-ons (SERE) wrap whichever base method runs when their config block is enabled.
"""

from sslx.errors import UserError
from sslx.methods.byol import Byol
from sslx.methods.cae import Cae
from sslx.methods.dino import Dino
from sslx.methods.ibot import Ibot
from sslx.methods.mocov3 import MocoV3
from sslx.methods.sage import Sage
from sslx.methods.sere import WithSere

__all__ = ["METHODS", "Byol", "Cae", "Dino", "Ibot", "MocoV3", "Sage", "WithSere", "make_method"]

METHODS = {"dino": Dino, "ibot": Ibot, "mocov3": MocoV3, "cae": Cae, "byol": Byol, "sage": Sage}


class UnknownMethodError(UserError):
  """config.method names no method."""


def make_method(config):
  """The method object for `config`, with the SERE add-on when config.sere.enabled."""
  if config.method not in METHODS:
    raise UnknownMethodError(f"config.method={config.method!r} is not a method; valid: "
                             f"{', '.join(sorted(METHODS))}")
  method = METHODS[config.method](config)
  sere = config.get("sere")
  if sere is not None and sere.enabled:
    method = WithSere(method, config)
  return method
