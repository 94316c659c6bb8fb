from . import hooks  # noqa: F401  (imported to register the hooks)
from .optim_wrapper import CPUAmpOptimWrapper

__all__ = ['CPUAmpOptimWrapper']
