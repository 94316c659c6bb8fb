"""Numbers and curves for looking at what a regression loss does.

Nothing here registers modules; it is imported by the plotting and
benchmark tools and by tests.
"""
from .curves import (Curve, balanced_l1_curve, figure_curves, l1_curve,
                     loss_curve, regression_errors, smooth_l1_curve)

__all__ = [
    'Curve', 'balanced_l1_curve', 'figure_curves', 'l1_curve', 'loss_curve',
    'regression_errors', 'smooth_l1_curve'
]
