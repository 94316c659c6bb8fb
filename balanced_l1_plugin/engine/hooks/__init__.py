# Each hook module is imported here so that importing the package
# registers it in the plugin's HOOKS registry.
from .gradient_balance_hook import RegressionGradientHook  # noqa: F401
from .nonfinite_check_hook import NonFiniteCheckHook  # noqa: F401
