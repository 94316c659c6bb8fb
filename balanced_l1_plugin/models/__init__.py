from .losses import BalancedL1Loss, balanced_l1_loss

__all__ = ['BalancedL1Loss', 'balanced_l1_loss']
