from . import hooks  # noqa: F401  (imported to register the hooks)
