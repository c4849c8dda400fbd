"""The one base class for mistakes a user can fix (config, data, devices).

main.py turns any `UserError` into a one-line `error: ...` message and exit status 1, so each
subclass's message must name the fix. Everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """Bad input or an impossible config; the message says what to change."""
