"""Balanced L1 Loss of Libra R-CNN as an MMDetection 3.x plugin.

Importing the package registers its modules under the scope
``balanced_l1_plugin`` (see :mod:`balanced_l1_plugin.registry`), which is
what ``custom_imports = dict(imports=['balanced_l1_plugin'])`` in a config
relies on.
"""
from . import engine, models  # noqa: F401  (imported to register)
from .models import BalancedL1Loss, balanced_l1_loss
from .version import __version__

__all__ = ['BalancedL1Loss', 'balanced_l1_loss', '__version__']
