"""Self-supervised methods the trainer can run, by config name.

A plain dict: `config.method` picks the class; each class takes the run config.
"""

from sslx.methods.dino import Dino

METHODS = {"dino": Dino}
