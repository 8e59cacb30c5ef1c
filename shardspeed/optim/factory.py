"""Build the optimizer named by the ds_config section ``optimizer: {type, params}``.

Names and parameters follow DeepSpeed's engine (``_configure_basic_optimizer``), so a
ds_config written for DeepSpeed builds the same algorithm with the same defaults:

======================  =====================================================================
``type`` (any case)     what is built
======================  =====================================================================
``Adam``                AdamW (decoupled decay) unless ``adam_w_mode: false``, then L2 Adam;
                        DeepSpeed's FusedAdam/CPUAdam defaults (``weight_decay`` 0.0)
``AdamW``               AdamW whatever ``adam_w_mode`` says (as in DeepSpeed)
``Lamb``                :class:`~shardspeed.optim.lamb.Lamb`
``Lion``                :class:`~shardspeed.optim.lion.Lion`
``Adagrad``, ``SGD``,   the ``torch.optim`` class of that name with torch's own parameters
any ``torch.optim``     and defaults (DeepSpeed passes these straight to torch too)
======================  =====================================================================

With ``torch_adam: true``, Adam/AdamW take torch's parameters and defaults instead (torch's
AdamW decays by 0.01 by default), exactly as DeepSpeed hands them to torch.

Speed: Adam and AdamW on CPU use torch's fused kernel (``fused=True``) unless the user chose
``fused`` or ``foreach``: at 10M fp32 parameters on 2 cores a step takes ~11 ms fused against
~50 ms foreach and ~45 ms for-loop.  SGD and Adagrad are as fast fused, but their fused kernels
reject sparse gradients, which their other paths accept, so they keep torch's default unless
``fused: true`` is given.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from shardspeed.config.errors import ConfigError, closest_key, unknown_key_message
from shardspeed.optim.lamb import Lamb, _check_hparams
from shardspeed.optim.lion import Lion

ModelParameters = Iterable[Tensor] | Iterable[dict[str, Any]]

PARAMS_PATH = "optimizer.params"

# DeepSpeed's own Adam keys (FusedAdam, plus CPUAdam's fp32_optimizer_states) and defaults.
_DS_ADAM_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "bias_correction": True, "betas": (0.9, 0.999), "eps": 1e-8,
    "weight_decay": 0.0, "amsgrad": False, "adam_w_mode": True, "torch_adam": False,
    "set_grad_none": True, "fp32_optimizer_states": True,
}

# Names DeepSpeed resolves itself but shardspeed does not implement; never fall through to a
# torch class of the same name (torch.optim.Muon is not DeepSpeed's Muon-with-auxiliary-Adam).
_UNSUPPORTED_DS = {
    "onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb",
    "muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD", "muon": "Muon",
}


def _torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    """Every public optimizer class in torch.optim, keyed by lower-case name."""
    found = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)
                and obj is not torch.optim.Optimizer and not name.startswith("_")):
            found[name.lower()] = obj
    return found


_TORCH = _torch_optimizers()
_NAMES: dict[str, str] = {
    **{key: cls.__name__ for key, cls in _TORCH.items() if key not in _UNSUPPORTED_DS},
    "adam": "Adam", "adamw": "AdamW", "lamb": "Lamb", "lion": "Lion",
}


def supported_optimizer_names() -> tuple[str, ...]:
    """Every ``optimizer.type`` that :func:`build_optimizer` accepts, in canonical spelling."""
    return tuple(sorted(_NAMES.values(), key=str.lower))


def build_optimizer(type_name: str, params: Mapping[str, Any] | None,
                    model_parameters: ModelParameters) -> torch.optim.Optimizer:
    """The optimizer for ``optimizer.type`` = ``type_name`` with ``optimizer.params`` = ``params``.

    ``model_parameters`` is anything torch optimizers accept: tensors, or param-group dicts whose
    own keys (``lr``, ``weight_decay``, ...) override ``params`` for that group.  Names are
    case-insensitive.  Raises :class:`ConfigError` naming ``optimizer.type`` or
    ``optimizer.params.<key>`` (with the closest valid spelling) for anything the user can fix.
    """
    key = _resolve_name(type_name)
    kwargs = dict(params or {})
    if "max_grad_norm" in kwargs:
        raise ConfigError(f"`{PARAMS_PATH}.max_grad_norm` is not accepted (DeepSpeed rejects it too): "
                          "clip gradients with the top-level `gradient_clipping` key instead")
    groups = list(model_parameters)
    if not groups:
        raise ValueError("build_optimizer got an empty parameter list")
    if key in ("adam", "adamw"):
        return _build_adam(key, kwargs, groups)
    if key == "lamb":
        return _construct(Lamb, "Lamb", _checked(kwargs, _signature_defaults(Lamb)), groups)
    if key == "lion":
        kwargs = _pop_ds_state_flags(kwargs, groups)
        return _construct(Lion, "Lion", _checked(kwargs, _signature_defaults(Lion)), groups)
    cls = _TORCH[key]
    return _construct(cls, cls.__name__, _checked(kwargs, _signature_defaults(cls)), groups)


def _resolve_name(type_name: str) -> str:
    """The lower-case key of a supported optimizer, or a ConfigError naming `optimizer.type`."""
    if not isinstance(type_name, str):
        raise ConfigError(f"`optimizer.type` must be a string such as \"AdamW\", got {type_name!r}")
    key = type_name.lower()
    if key in _UNSUPPORTED_DS:
        raise ConfigError(f"`optimizer.type` = {type_name!r}: DeepSpeed's {_UNSUPPORTED_DS[key]} is not "
                          "implemented in shardspeed; use Adam, AdamW, Lamb or Lion")
    if key not in _NAMES:
        guess = closest_key(key, _NAMES)
        hint = f" — did you mean `{_NAMES[guess]}`?" if guess else ""
        raise ConfigError(f"unknown optimizer `optimizer.type` = {type_name!r}{hint} "
                          f"(supported: {', '.join(supported_optimizer_names())})")
    return key


def _build_adam(key: str, kwargs: dict[str, Any], groups: list[Any]) -> torch.optim.Optimizer:
    """DeepSpeed's Adam/AdamW: decoupled decay unless type Adam with ``adam_w_mode: false``."""
    flags = _checked({k: kwargs.pop(k) for k in ("torch_adam", "adam_w_mode") if k in kwargs},
                     _DS_ADAM_DEFAULTS)
    decoupled = key == "adamw" or flags.get("adam_w_mode", True)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    if flags.get("torch_adam", False):
        # DeepSpeed hands the remaining keys to torch unchanged: torch's names and defaults.
        torch_kwargs = _checked(kwargs, _signature_defaults(cls), extra_valid=("torch_adam", "adam_w_mode"))
        return _construct(cls, cls.__name__, {**_fast_path(cls, torch_kwargs, groups), **torch_kwargs}, groups)
    kwargs = _pop_ds_state_flags(kwargs, groups)
    opts = {**_without(_DS_ADAM_DEFAULTS, "adam_w_mode", "torch_adam", "set_grad_none", "fp32_optimizer_states"),
            **_checked(kwargs, _DS_ADAM_DEFAULTS)}
    if not opts.pop("bias_correction"):
        if opts["amsgrad"]:
            raise ConfigError(f"`{PARAMS_PATH}.amsgrad` = true needs `{PARAMS_PATH}.bias_correction` = true")
        del opts["amsgrad"]
        return _construct(AdamNoBiasCorrection, "Adam", {**opts, "decoupled": decoupled}, groups)
    return _construct(cls, cls.__name__, {**_fast_path(cls, opts, groups), **opts}, groups)


def _pop_ds_state_flags(kwargs: dict[str, Any], groups: list[Any]) -> dict[str, Any]:
    """Accept DeepSpeed's ``set_grad_none`` / ``fp32_optimizer_states`` where they hold, else raise.

    shardspeed's optimizers always free gradients on ``zero_grad()`` and keep state in the
    parameter dtype (fp32 master weights under mixed precision), so only the settings that
    describe that behaviour are accepted; anything else would be silently ignored.
    """
    kwargs = dict(kwargs)
    flags = _checked({k: kwargs.pop(k) for k in ("set_grad_none", "fp32_optimizer_states") if k in kwargs},
                     _DS_ADAM_DEFAULTS)
    if flags.get("set_grad_none") is False:
        raise ConfigError(f"`{PARAMS_PATH}.set_grad_none` = false is not supported: zero_grad() always "
                          "sets gradients to None; remove the key")
    low = sorted({str(t.dtype) for t in _tensors(groups) if t.dtype in (torch.float16, torch.bfloat16)})
    if flags.get("fp32_optimizer_states") is True and low:
        raise ConfigError(f"`{PARAMS_PATH}.fp32_optimizer_states` = true, but parameters are {', '.join(low)} and "
                          "optimizer state follows the parameter dtype; give the optimizer fp32 master "
                          "parameters (bf16/fp16 mixed precision does) or remove the key")
    return kwargs


def _fast_path(cls: type[torch.optim.Optimizer], kwargs: Mapping[str, Any], groups: list[Any]) -> dict[str, Any]:
    """``{"fused": True}`` for Adam/AdamW on CPU floating-point tensors unless the user chose a path."""
    if cls not in (torch.optim.Adam, torch.optim.AdamW) or {"fused", "foreach", "differentiable"} & kwargs.keys():
        return {}
    tensors = list(_tensors(groups))
    if tensors and all(t.device.type == "cpu" and t.is_floating_point() for t in tensors):
        return {"fused": True}
    return {}


def _construct(cls: Callable[..., torch.optim.Optimizer], display: str, kwargs: dict[str, Any],
               groups: list[Any]) -> torch.optim.Optimizer:
    """``cls(groups, **kwargs)``, turning a rejected hyperparameter into a ConfigError."""
    try:
        return cls(groups, **kwargs)
    except ValueError as exc:  # torch's and our range checks ("Invalid learning rate: -1.0")
        raise ConfigError(f"`{PARAMS_PATH}` rejected by {display}: {exc}") from exc


def _signature_defaults(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """Keyword parameters of ``cls.__init__`` (except the parameters themselves) and their defaults."""
    sig = inspect.signature(cls.__init__)
    skip = {"self", "params", "model_params"}
    return {name: (None if p.default is inspect.Parameter.empty else p.default)
            for name, p in sig.parameters.items()
            if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _checked(kwargs: Mapping[str, Any], defaults: Mapping[str, Any],
             extra_valid: Iterable[str] = ()) -> dict[str, Any]:
    """``kwargs`` with every key known and every value of its default's type, or a ConfigError.

    A whole float (``1e3``) is accepted where the default is an int, and a list where it is a
    tuple (JSON has neither distinction).
    """
    out = {}
    for name, value in kwargs.items():
        if name not in defaults:
            raise ConfigError(unknown_key_message(PARAMS_PATH, name, [*defaults, *extra_valid])
                              + f" ({', '.join(sorted(defaults))} are accepted)")
        out[name] = _coerce(name, value, defaults[name])
        _check_range(name, out[name])
    return out


def _coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` in the type of ``default``; a ConfigError naming the key when it cannot be."""
    where = f"`{PARAMS_PATH}.{name}`"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, Tensor):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}"
                              + (" (resolve \"auto\" before building the optimizer)" if value == "auto" else ""))
        if isinstance(default, int) and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if isinstance(default, tuple):
        if (not isinstance(value, (list, tuple)) or len(value) != len(default)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{where} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(value)
    return value


def _check_range(name: str, value: Any) -> None:
    """Reject the out-of-domain values every optimizer shares, before torch's vaguer message."""
    where = f"`{PARAMS_PATH}.{name}`"
    if name in ("lr", "eps", "weight_decay", "momentum") and isinstance(value, (int, float)):
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{where} must be a finite number >= 0, got {value!r}")
    if name == "betas" and isinstance(value, tuple) and not all(0 <= b < 1 for b in value):
        raise ConfigError(f"{where} must hold values in [0, 1), got {list(value)!r}")


def _tensors(groups: list[Any]) -> Iterable[Tensor]:
    """Every parameter tensor in a torch-style parameter list (tensors, named tuples or groups)."""
    for item in groups:
        if isinstance(item, Mapping):
            members = item["params"]
            yield from ([members] if isinstance(members, Tensor) else (m[1] if isinstance(m, tuple) else m
                                                                         for m in members))
        else:
            yield item[1] if isinstance(item, tuple) else item


def _without(d: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


class AdamNoBiasCorrection(torch.optim.Optimizer):
    """Adam without bias correction: DeepSpeed's ``bias_correction: false``, which torch lacks.

    For each tensor ``w`` with gradient ``g`` (``m``, ``v`` start at 0)::

        g = g + weight_decay * w                 (only when not decoupled: L2 Adam)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w = w * (1 - lr * weight_decay)          (only when decoupled: AdamW)
        w = w - lr * m / (sqrt(v) + eps)
    """

    def __init__(self, params: ModelParameters, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = True) -> None:
        _check_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decoupled=decoupled))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p)
        return loss

    def _update(self, group: dict[str, Any], p: Tensor) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        assert p.grad is not None  # step() only updates parameters that have a gradient
        grad = p.grad if group["decoupled"] or wd == 0 else p.grad.add(p, alpha=wd)
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["decoupled"] and wd != 0:
            p.mul_(1 - lr * wd)
        p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-lr)
