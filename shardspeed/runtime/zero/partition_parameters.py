"""DeepSpeed's `deepspeed.runtime.zero.partition_parameters`, as far as other libraries reach into it.

transformers wraps every `zero.Init` in `prevent_arange_dtype_change()`, which reads and swaps
`zero_wrapper_for_fp_tensor_constructor` and compares with `_orig_torch_arange`. DeepSpeed's Init
wraps torch's tensor constructors to cast them; shardspeed's does not (it casts parameters as each
module is partitioned), so the wrapper is the identity and there is no dtype change to prevent.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...accelerator import get_accelerator
from ...zero import GatheredParameters, Init, register_external_parameter, unregister_external_parameter

_orig_torch_arange = torch.arange


def zero_wrapper_for_fp_tensor_constructor(fn: Callable[..., Any], target_fp_dtype: torch.dtype) -> Callable[..., Any]:
    """`fn` itself: shardspeed's zero.Init leaves torch's tensor constructors alone."""
    return fn


__all__ = ["GatheredParameters", "Init", "get_accelerator", "register_external_parameter", "unregister_external_parameter",
           "zero_wrapper_for_fp_tensor_constructor"]
