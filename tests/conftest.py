"""Shared test set-up: CPU only, absl flags parsed (grain workers need it), and one XLA
compilation cache for the session."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests compile the same programs again (every evaluation mode re-jits a method's forward;
# subprocess tests compile the step the in-process tests compiled). JAX's persistent cache turns
# those repeats into loads. It starts empty each session, so no test depends on an old run; the
# test workers (pytest-xdist) and the subprocesses they start inherit the variable.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
# LLVM's optimisation of XLA:CPU code is most of a small test's compile time (one
# jax.random.normal draw of a conv kernel: seconds at the default level, a tenth of that at 0)
# and little of its run time (matmuls and convs are library calls either way). The goldens hold
# at both levels. Subprocesses inherit it; scripts that set a device count append to it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  ).strip()
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sslx-tests-xla-cache-")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
