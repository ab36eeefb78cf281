"""The ``isearch`` command line."""
from .main import app, main
from . import search  # noqa: F401,E402  (registers search on app)
from . import train  # noqa: F401,E402  (registers clean, train-rmac, train-rpn, finetune on app)
from . import maintenance  # noqa: F401,E402  (registers check, repair on app)

__all__ = ["app", "main"]
