"""Mixed precision on machines without a GPU."""
import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper

from balanced_l1_plugin.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` that runs the forward pass under CPU autocast.

    MMEngine's ``AmpOptimWrapper`` asserts that a GPU is present, so
    ``tools/train.py --amp`` selects this wrapper when CUDA is unavailable.
    bfloat16 has float32's exponent range, so no loss scaling is needed;
    parameters, gradients and optimizer state stay float32.

    Args:
        dtype (str): ``'bfloat16'`` or ``'float16'``. Defaults to
            ``'bfloat16'``.
        **kwargs: The arguments of ``OptimWrapper``.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs) -> None:
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(
                f"dtype must be 'bfloat16' or 'float16', got {dtype!r}")
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype)

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        with super().optim_context(model), torch.autocast(
                'cpu', dtype=self.cast_dtype):
            yield
