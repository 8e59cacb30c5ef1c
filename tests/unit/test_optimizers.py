"""The ds_config optimizer factory and the Lamb / Lion / uncorrected-Adam update rules.

Update rules are checked against straightforward per-tensor references written here from the
published formulas, in float64 so that a 1e-10 tolerance only absorbs summation order: any
change to a formula (a missing bias-correction factor, decay coupled the wrong way, an
unclamped trust ratio) moves parameters by far more than that.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch

from shardspeed.config.errors import ConfigError
from shardspeed.optim import (
    AdamNoBiasCorrection,
    Lamb,
    Lion,
    build_optimizer,
    supported_optimizer_names,
)

# float64 everywhere: differences between the foreach/fused kernels and the loops below are
# reordered sums only, ~1e-16 relative per step.
RTOL, ATOL = 1e-10, 1e-12
STEPS = 5
SHAPES = [(6, 5), (5,), (3, 2, 4)]


def make_params(seed: int = 0, zero_index: int | None = None) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    if zero_index is not None:
        params[zero_index].data.zero_()
    return params


def grads_for(step: int, params: list[torch.Tensor], zero_index: int | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    if zero_index is not None:
        grads[zero_index].zero_()
    return grads


def run_and_compare(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                    reference_step: Callable[[int, list[torch.Tensor]], None],
                    ref_params: list[torch.Tensor], zero_grad_index: int | None = None) -> None:
    """Step `opt` and the reference on identical gradients; parameters must agree every step."""
    for step in range(1, STEPS + 1):
        grads = grads_for(step, params, zero_grad_index)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        reference_step(step, grads)
        for i, (p, r) in enumerate(zip(params, ref_params)):
            torch.testing.assert_close(p.detach(), r, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, i=i, step=step: f"param {i} at step {step}: {m}")


# ---------------------------------------------------------------- names, classes, defaults

@pytest.mark.parametrize("type_name, params, cls, expected", [
    ("Adam", {}, torch.optim.AdamW,
     dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False)),
    ("adam", {"adam_w_mode": False}, torch.optim.Adam, dict(weight_decay=0.0)),
    ("ADAMW", {"adam_w_mode": False}, torch.optim.AdamW, dict(weight_decay=0.0)),
    ("AdamW", {"torch_adam": True}, torch.optim.AdamW, dict(weight_decay=0.01)),
    ("Adam", {"torch_adam": True, "adam_w_mode": False}, torch.optim.Adam, dict(weight_decay=0)),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}, torch.optim.AdamW, dict(amsgrad=True, weight_decay=0.1)),
    ("Adam", {"bias_correction": False}, AdamNoBiasCorrection, dict(decoupled=True, lr=1e-3, eps=1e-8)),
    ("Adam", {"bias_correction": False, "adam_w_mode": False}, AdamNoBiasCorrection, dict(decoupled=False)),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, torch.optim.SGD,
     dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("Adagrad", {}, torch.optim.Adagrad, dict(lr=1e-2, eps=1e-10, weight_decay=0)),
    ("Lamb", {}, Lamb, dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                            eps_inside_sqrt=False, weight_decay=0.0, max_grad_norm=0.0,
                            max_coeff=10.0, min_coeff=0.01)),
    ("lamb", {"max_coeff": 0.3, "min_coeff": 0.01, "bias_correction": False}, Lamb,
     dict(max_coeff=0.3, bias_correction=False)),
    ("lion", {}, Lion, dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)),
    ("Lion", {"betas": [0.95, 0.98], "weight_decay": 0.1}, Lion, dict(betas=(0.95, 0.98), weight_decay=0.1)),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9}, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9)),
    ("rmsprop", {}, torch.optim.RMSprop, dict(lr=1e-2)),
    ("LBFGS", {"max_iter": 1e3}, torch.optim.LBFGS, dict(max_iter=1000)),
])
def test_each_name_builds_the_right_class_with_its_hyperparameters(type_name, params, cls, expected):
    """Catches a name routed to the wrong class, a lost DeepSpeed default, or a key not passed on."""
    opt = build_optimizer(type_name, params, make_params())
    assert type(opt) is cls
    for key, value in expected.items():
        assert opt.defaults[key] == value, key
        assert type(opt.defaults[key]) is type(value), f"{key}: {type(opt.defaults[key])}"


def test_adam_uses_the_fused_cpu_kernel_unless_the_user_picks_a_path():
    """Catches losing the ~4x faster fused CPU step, or overriding a user's explicit choice."""
    assert build_optimizer("AdamW", {}, make_params()).defaults["fused"] is True
    chosen = build_optimizer("AdamW", {"torch_adam": True, "foreach": True}, make_params())
    assert chosen.defaults["foreach"] is True and not chosen.defaults["fused"]
    assert not build_optimizer("SGD", {"lr": 0.1}, make_params()).defaults["fused"]


def test_supported_names_list_the_deepspeed_and_torch_names():
    names = supported_optimizer_names()
    for name in ("Adam", "AdamW", "Lamb", "Lion", "Adagrad", "SGD", "RMSprop"):
        assert name in names
    assert "Muon" not in names  # DeepSpeed's Muon is not torch's; refused, not substituted


# ---------------------------------------------------------------- Adam family vs torch

@pytest.mark.parametrize("adam_w_mode, reference_cls", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_adam_w_mode_selects_decoupled_or_l2_decay(adam_w_mode, reference_cls):
    """Catches `Adam` building classic L2 Adam by default (DeepSpeed builds AdamW), or the reverse."""
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    params, ref_params = make_params(), make_params()
    opt = build_optimizer("Adam", {**hp, "adam_w_mode": adam_w_mode}, params)
    ref = reference_cls(ref_params, foreach=False, **hp)

    def reference_step(step, grads):
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        ref.step()

    run_and_compare(opt, params, reference_step, ref_params)
    # The decay must make the two variants differ, or this test could not tell them apart.
    other_cls = torch.optim.Adam if reference_cls is torch.optim.AdamW else torch.optim.AdamW
    other_params = make_params()
    other = other_cls(other_params, foreach=False, **hp)
    for step in range(1, STEPS + 1):
        for o, g in zip(other_params, grads_for(step, other_params)):
            o.grad = g
        other.step()
    assert not torch.allclose(other_params[0].detach(), params[0].detach(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_adam_without_bias_correction_matches_the_plain_rule(adam_w_mode):
    """Catches bias correction applied anyway, or the decay coupled the wrong way."""
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    params, ref_params = make_params(), [p.detach().clone() for p in make_params()]
    opt = build_optimizer("Adam", dict(lr=lr, betas=[b1, b2], eps=eps, weight_decay=wd,
                                       bias_correction=False, adam_w_mode=adam_w_mode), params)
    m = [torch.zeros_like(r) for r in ref_params]
    v = [torch.zeros_like(r) for r in ref_params]

    def reference_step(step, grads):
        for i, (w, g) in enumerate(zip(ref_params, grads)):
            if not adam_w_mode:
                g = g + wd * w
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            if adam_w_mode:
                w.mul_(1 - lr * wd)
            w.sub_(lr * m[i] / (v[i].sqrt() + eps))

    run_and_compare(opt, params, reference_step, ref_params)


# ---------------------------------------------------------------- Lamb vs a per-tensor reference

class ReferenceLamb:
    """LAMB exactly as documented on `Lamb`, one tensor at a time, with plain tensor maths."""

    def __init__(self, params, groups_hp):
        self.params, self.hp = params, groups_hp  # hp[i]: hyperparameters of params[i]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.coeffs: list[float] = []

    def step(self, t, grads):
        self.coeffs = []
        clip = {}
        for i, hp in enumerate(self.hp):  # one clip factor per group, over that group's grads
            gid = hp["group"]
            clip.setdefault(gid, 0.0)
            clip[gid] += float(grads[i].pow(2).sum())
        for i, (w, g) in enumerate(zip(self.params, grads)):
            hp = self.hp[i]
            b1, b2 = hp["betas"]
            if hp["max_grad_norm"] > 0:
                g = g / max(1.0, (math.sqrt(clip[hp["group"]]) + 1e-6) / hp["max_grad_norm"])
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            if hp["eps_inside_sqrt"]:
                u = self.m[i] / torch.sqrt(self.v[i] + hp["eps"])
            else:
                u = self.m[i] / (torch.sqrt(self.v[i]) + hp["eps"])
            u = u + hp["weight_decay"] * w
            w_norm, u_norm = float(w.norm()), float(u.norm())
            r = 1.0
            if w_norm > 0 and u_norm > 0:
                r = min(max(w_norm / u_norm, hp["min_coeff"]), hp["max_coeff"])
            k = math.sqrt(1 - b2**t) / (1 - b1**t) if hp["bias_correction"] else 1.0
            w.sub_(hp["lr"] * k * r * u)
            self.coeffs.append(r)


LAMB_DEFAULTS = dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, eps_inside_sqrt=False,
                     weight_decay=0.0, max_grad_norm=0.0, max_coeff=10.0, min_coeff=0.01)


@pytest.mark.parametrize("overrides", [
    dict(lr=1e-2, weight_decay=0.01),
    dict(lr=1e-2, weight_decay=0.01, bias_correction=False, eps_inside_sqrt=True),
    dict(lr=5e-2, weight_decay=0.1, max_coeff=0.3, min_coeff=0.2),  # both clamps bite
])
def test_lamb_matches_the_reference_with_a_zero_norm_parameter(overrides):
    """Catches a wrong trust ratio, clamp, zero-norm fallback, bias-correction factor or eps mode.

    Parameter 1 starts at zero (||w|| = 0, so its ratio must be exactly 1 on the first step).
    """
    hp = {**LAMB_DEFAULTS, **overrides}
    params = make_params(zero_index=1)
    ref_params = [p.detach().clone() for p in params]
    opt = build_optimizer("Lamb", overrides, params)
    ref = ReferenceLamb(ref_params, [{**hp, "group": 0}] * len(params))
    seen: list[list[float]] = []

    def reference_step(step, grads):
        ref.step(step, grads)
        assert opt.get_lamb_coeffs() == pytest.approx(ref.coeffs, rel=1e-9)
        seen.append(ref.coeffs)

    run_and_compare(opt, params, reference_step, ref_params)
    assert seen[0][1] == 1.0  # the zero-norm fallback was exercised
    if "max_coeff" in overrides:
        flat = [c for cs in seen for c in cs if c != 1.0]
        assert hp["max_coeff"] in flat and hp["min_coeff"] in flat  # both clamps exercised


def test_lamb_zero_update_and_gradient_clipping_per_group():
    """Catches a NaN ratio when ||u|| = 0, and max_grad_norm measured across the wrong tensors.

    Group 0 clips at 0.5 (its gradient norm is ~5, so clipping is active); group 1 holds a
    parameter whose gradient is always zero and has no decay, so its update is 0 and it must
    not move.
    """
    params = make_params()
    ref_params = [p.detach().clone() for p in params]
    g0 = dict(LAMB_DEFAULTS, lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)
    g1 = dict(LAMB_DEFAULTS, lr=1e-1, weight_decay=0.0)
    opt = Lamb([{"params": params[:2], "lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 0.5},
                {"params": params[2:], "lr": 1e-1}])
    ref = ReferenceLamb(ref_params, [{**g0, "group": 0}, {**g0, "group": 0}, {**g1, "group": 1}])
    start = params[2].detach().clone()
    run_and_compare(opt, params, ref.step, ref_params, zero_grad_index=2)
    assert torch.equal(params[2].detach(), start)
    assert opt.get_lamb_coeffs()[2] == 1.0


def test_lamb_rejects_amsgrad():
    with pytest.raises(ConfigError, match="amsgrad"):
        build_optimizer("Lamb", {"amsgrad": True}, make_params())


# ---------------------------------------------------------------- Lion vs a per-tensor reference

def test_lion_matches_the_reference_with_groups_and_decay():
    """Catches coupled decay, the momentum update order (sign uses the old m), or a group's lr lost."""
    params = make_params()
    ref_params = [p.detach().clone() for p in params]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-2, "weight_decay": 0.0}]
    # betas far apart and a short momentum memory, so that swapping them or updating m before
    # taking the sign changes many signs within a few steps.
    opt = build_optimizer("Lion", {"lr": 1e-2, "betas": [0.95, 0.5], "weight_decay": 0.5}, groups)
    hps = [(1e-2, 0.5), (1e-2, 0.5), (3e-2, 0.0)]
    b1, b2 = 0.95, 0.5
    m = [torch.zeros_like(r) for r in ref_params]

    def reference_step(step, grads):
        for i, (w, g) in enumerate(zip(ref_params, grads)):
            lr, wd = hps[i]
            c = b1 * m[i] + (1 - b1) * g
            w.mul_(1 - lr * wd).sub_(lr * torch.sign(c))
            m[i] = b2 * m[i] + (1 - b2) * g

    run_and_compare(opt, params, reference_step, ref_params)


def test_lion_leaves_an_element_with_zero_gradient_and_momentum_in_place():
    """Catches sign(0) treated as +1 or -1 (the paper's sign is 0 there)."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = Lion([p], lr=0.1)
    p.grad = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, 1.1, 1.0, 1.0], dtype=torch.float64))


# ---------------------------------------------------------------- param groups

@pytest.mark.parametrize("type_name", ["Adam", "Lamb", "Lion", "SGD"])
def test_param_groups_keep_their_own_lr(type_name):
    """Catches config params overwriting a group's own lr, or groups collapsed into one."""
    params = make_params()
    groups = [{"params": params[:1], "lr": 0.5}, {"params": params[1:]}]
    opt = build_optimizer(type_name, {"lr": 1e-3}, groups)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-3]


def test_adam_param_groups_step_like_torch():
    """Catches a per-group hyperparameter ignored in the update itself, not just stored."""
    params, ref_params = make_params(), make_params()
    opt = build_optimizer("AdamW", {"lr": 1e-3, "weight_decay": 0.1},
                          [{"params": params[:1], "lr": 0.5, "weight_decay": 0.0}, {"params": params[1:]}])
    ref = torch.optim.AdamW([{"params": ref_params[:1], "lr": 0.5, "weight_decay": 0.0},
                             {"params": ref_params[1:]}], lr=1e-3, weight_decay=0.1, foreach=False)

    def reference_step(step, grads):
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        ref.step()

    run_and_compare(opt, params, reference_step, ref_params)


# ---------------------------------------------------------------- errors a user can cause

@pytest.mark.parametrize("type_name, params, pattern", [
    ("Adamm", {}, r"`optimizer\.type`.*did you mean `Adam`\?"),
    ("lamd", {}, r"`optimizer\.type`.*did you mean `Lamb`\?"),
    ("rmsprob", {}, r"`optimizer\.type`.*did you mean `RMSprop`\?"),
    ("OneBitAdam", {}, r"`optimizer\.type`.*not implemented"),
    ("Muon", {}, r"`optimizer\.type`.*not implemented"),
    ("Adam", {"weight_decy": 0.1}, r"`optimizer\.params\.weight_decy`.*did you mean `optimizer\.params\.weight_decay`"),
    ("Adam", {"adamw_mode": False}, r"`optimizer\.params\.adamw_mode`.*did you mean `optimizer\.params\.adam_w_mode`"),
    ("Adam", {"torch_adam": True, "bias_correction": False}, r"`optimizer\.params\.bias_correction`"),
    ("SGD", {"momentun": 0.9}, r"`optimizer\.params\.momentun`.*did you mean `optimizer\.params\.momentum`"),
    ("Lamb", {"max_coef": 1.0}, r"did you mean `optimizer\.params\.max_coeff`"),
    ("Lion", {"beta": [0.9, 0.99]}, r"did you mean `optimizer\.params\.betas`"),
    ("Adam", {"max_grad_norm": 1.0}, r"`optimizer\.params\.max_grad_norm`.*`gradient_clipping`"),
    ("Adam", {"lr": "auto"}, r"`optimizer\.params\.lr` must be a number.*auto"),
    ("Adam", {"lr": -1e-3}, r"`optimizer\.params\.lr` must be a finite number >= 0"),
    ("Adam", {"betas": [0.9, 1.5]}, r"`optimizer\.params\.betas` must hold values in \[0, 1\)"),
    ("Adam", {"betas": [0.9]}, r"`optimizer\.params\.betas` must be a list of 2 numbers"),
    ("Adam", {"bias_correction": "yes"}, r"`optimizer\.params\.bias_correction` must be true or false"),
    ("Adam", {"set_grad_none": False}, r"`optimizer\.params\.set_grad_none`"),
    ("Lamb", {"min_coeff": 20.0}, r"`optimizer\.params`.*min_coeff"),
    ("RMSprop", {"alpha": -1.0}, r"`optimizer\.params`.*alpha"),
    (3, {}, r"`optimizer\.type` must be a string"),
])
def test_errors_name_the_key_and_suggest_the_fix(type_name, params, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_optimizer(type_name, params, make_params())


def test_fp32_optimizer_states_is_refused_for_low_precision_parameters():
    """Catches silently keeping bf16 state when the config asked for fp32 state."""
    bf16 = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    with pytest.raises(ConfigError, match=r"fp32_optimizer_states.*bfloat16"):
        build_optimizer("Adam", {"fp32_optimizer_states": True}, bf16)
    assert isinstance(build_optimizer("Adam", {"fp32_optimizer_states": True}, make_params()), torch.optim.AdamW)


@pytest.mark.parametrize("type_name", ["Lamb", "Lion", "Adam"])
def test_state_dict_round_trip_continues_identically(type_name):
    """Catches optimizer state (step count, moments) that a checkpoint does not carry."""
    hp = {"lr": 1e-2, "weight_decay": 0.01}
    params = make_params()
    opt = build_optimizer(type_name, dict(hp, bias_correction=False) if type_name == "Adam" else hp, params)
    for step in (1, 2):
        for p, g in zip(params, grads_for(step, params)):
            p.grad = g
        opt.step()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = build_optimizer(type_name, dict(hp, bias_correction=False) if type_name == "Adam" else hp,
                              resumed_params)
    # A deep copy, as a checkpoint file would hold: load_state_dict may alias the source tensors.
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, r, g in zip(params, resumed_params, grads_for(3, params)):
        p.grad, r.grad = g, g.clone()
    opt.step()
    resumed.step()
    for p, r in zip(params, resumed_params):
        assert torch.equal(p.detach(), r.detach())
