"""Registries of the plugin, children of MMDetection's.

Each registry here has the scope ``balanced_l1_plugin`` and MMDetection's
registry of the same kind as its parent. A config therefore names the
plugin's classes with the scope prefix
(``type='balanced_l1_plugin.BalancedL1Loss'``) and MMDetection's names stay
untouched: ``type='BalancedL1Loss'`` still builds MMDetection's own loss.
"""
from mmdet.registry import HOOKS as MMDET_HOOKS
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.registry import OPTIM_WRAPPERS as MMDET_OPTIM_WRAPPERS
from mmengine.registry import Registry

SCOPE = 'balanced_l1_plugin'

MODELS = Registry(
    'model',
    parent=MMDET_MODELS,
    scope=SCOPE,
    locations=['balanced_l1_plugin.models'])

HOOKS = Registry(
    'hook',
    parent=MMDET_HOOKS,
    scope=SCOPE,
    locations=['balanced_l1_plugin.engine'])

OPTIM_WRAPPERS = Registry(
    'optim_wrapper',
    parent=MMDET_OPTIM_WRAPPERS,
    scope=SCOPE,
    locations=['balanced_l1_plugin.engine'])
