"""DeepSpeedCPUAdam / Adagrad / Lion and FusedAdam against torch's and shardspeed's own optimizers.

Where both sides run the same torch kernel on the same tensors the results must be bitwise equal;
against a different code path (torch's for-loop, a float64 hand-written rule) the tolerance is
stated where it is used.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import pytest
import torch

from shardspeed.offload.cpu_optimizers import DeepSpeedCPUAdagrad, DeepSpeedCPUAdam, DeepSpeedCPULion, FusedAdam
from shardspeed.optim import AdamNoBiasCorrection, Lion

pytestmark = pytest.mark.timeout(60)

SHAPES = [(7, 5), (13,), (2, 3, 4)]
STEPS = 5


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def grads_for(step: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range = range(STEPS),
        step: Callable[[torch.optim.Optimizer], object] = lambda o: o.step()) -> list[torch.Tensor]:
    for k in steps:
        for p, g in zip(params, grads_for(k, params[0].dtype)):
            p.grad = g
        step(opt)
    return [p.detach().clone() for p in params]


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"param {i}: max diff {(x.double() - y.double()).abs().max().item()}"


# ---------------------------------------------------------------- Adam

@pytest.mark.parametrize("adamw_mode", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cpu_adam_matches_torch(adamw_mode: bool, amsgrad: bool) -> None:
    """Catches decay coupled the wrong way (Adam vs AdamW), a dropped AMSGrad max, or wrong state."""
    hyper = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad)
    torch_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    ours = run(DeepSpeedCPUAdam(p := make_params(), adamw_mode=adamw_mode, **hyper), p)
    # Same fused kernel, same tensors: bitwise.
    assert_equal(ours, run(torch_cls(q := make_params(), fused=True, **hyper), q))
    # torch's for-loop orders the arithmetic differently: a few fp32 ulps after 5 steps.
    loop = run(torch_cls(r := make_params(), foreach=False, **hyper), r)
    for x, y in zip(ours, loop):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [DeepSpeedCPUAdam, FusedAdam])
@pytest.mark.parametrize("decoupled", [True, False])
def test_no_bias_correction_matches_hand_written_rule(cls: type, decoupled: bool) -> None:
    """bias_correction=False runs the fused kernel with step=inf; catches any bias factor left over."""
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.99), 1e-8, 0.05
    mode = {"adamw_mode": decoupled} if cls is DeepSpeedCPUAdam else {"adam_w_mode": decoupled}
    ours = run(cls(p := make_params(torch.float64), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                   bias_correction=False, **mode), p)
    ref = [t.detach().clone() for t in make_params(torch.float64)]
    m = [torch.zeros_like(t) for t in ref]
    v = [torch.zeros_like(t) for t in ref]
    for k in range(STEPS):
        for w, mi, vi, g in zip(ref, m, v, grads_for(k, torch.float64)):
            if not decoupled:
                g = g + wd * w
            mi.mul_(b1).add_((1 - b1) * g)
            vi.mul_(b2).add_((1 - b2) * g * g)
            if decoupled:
                w.mul_(1 - lr * wd)
            w.sub_(lr * mi / (vi.sqrt() + eps))
    for x, y in zip(ours, ref):  # float64: only summation order differs
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    nbc = run(AdamNoBiasCorrection(q := make_params(torch.float64), lr=lr, betas=(b1, b2), eps=eps,
                                   weight_decay=wd, decoupled=decoupled), q)
    for x, y in zip(ours, nbc):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_grad_scale_folds_into_the_step() -> None:
    """step(grad_scale=s) must equal dividing the gradients by s first (ZeRO's unscale pass)."""
    scale = 65536 * 1.7  # loss scale times a clip ratio: 1/scale is inexact in fp32

    def scaled_grads(o: torch.optim.Optimizer, params: list[torch.nn.Parameter], fold: bool) -> None:
        for p in params:
            p.grad.mul_(scale)
        if fold:
            o.step(grad_scale=scale)
        else:
            torch._foreach_mul_([p.grad for p in params], 1 / scale)
            o.step()

    a = run(DeepSpeedCPUAdam(p := make_params(), weight_decay=0.01), p, step=lambda o: scaled_grads(o, p, True))
    b = run(DeepSpeedCPUAdam(q := make_params(), weight_decay=0.01), q, step=lambda o: scaled_grads(o, q, False))
    for x, y in zip(a, b):  # gradients differ by ~1 ulp; the moments' ratio absorbs it
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="grad_scale"):
            DeepSpeedCPUAdam(make_params()).step(grad_scale=bad)


@pytest.mark.parametrize("cls", [DeepSpeedCPUAdam, FusedAdam, DeepSpeedCPUAdagrad, DeepSpeedCPULion])
def test_power_of_two_grad_scale_is_exact(cls: type) -> None:
    """Every optimizer must divide by grad_scale (not multiply, not ignore it): x4 then /4 is exact."""
    def times_four(o: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        for p in params:
            p.grad.mul_(4)
        o.step(grad_scale=4.0)

    assert_equal(run(cls(p := make_params()), p, step=lambda o: times_four(o, p)), run(cls(q := make_params()), q))


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16])
def test_fp16_param_groups_receive_updated_params(target: torch.dtype) -> None:
    """DeepSpeed's copy-out: each 16-bit tensor must hold its updated fp32 parameter, rounded."""
    params = make_params()
    opt = DeepSpeedCPUAdam([{"params": params[:2]}, {"params": params[2:]}])
    copies = [[torch.zeros(p.shape, dtype=target) for p in params[:2]], [torch.zeros(SHAPES[2], dtype=target)]]
    run(opt, params, range(2), step=lambda o: o.step(fp16_param_groups=copies))
    for c, p in zip(copies[0] + copies[1], params):
        assert torch.equal(c, p.detach().to(target))
    with pytest.raises(ValueError, match="fp16_param_groups"):
        opt.step(fp16_param_groups=copies[:1])
    with pytest.raises(ValueError, match=r"fp16_param_groups\[1\]\[0\] has shape"):
        opt.step(fp16_param_groups=[copies[0], [torch.zeros(3, dtype=target)]])


def test_bf16_params_keep_fp32_states() -> None:
    """16-bit parameters step through fp32 with fp32 moments: equal to an fp32 step rounded to bf16."""
    params = make_params(torch.bfloat16)
    opt = DeepSpeedCPUAdam(params, lr=1e-2, weight_decay=0.1)
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    for k in range(STEPS):
        for p, r, g in zip(params, ref, grads_for(k, torch.bfloat16)):
            p.grad = g
            r.data.copy_(p.detach())
            r.grad = g.float()
        opt.step()
        ref_opt.step()
        assert_equal([p.detach() for p in params], [r.detach().bfloat16() for r in ref])
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
               for s in opt.state.values())
    low = DeepSpeedCPUAdam(q := make_params(torch.bfloat16), fp32_optimizer_states=False)
    run(low, q, range(1))
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in low.state.values())


def test_non_contiguous_param_and_grad() -> None:
    """torch 2.13's fused CPU kernel silently mis-updates when grad strides differ from the param's.

    A transposed parameter with a contiguous gradient must still get AdamW's update.
    """
    base = torch.randn(6, 4)
    p = torch.nn.Parameter(base.clone().t())  # strides (1, 4)
    q = torch.nn.Parameter(base.clone().t().contiguous())
    opt, ref = DeepSpeedCPUAdam([p]), torch.optim.AdamW([q], weight_decay=0, foreach=False)
    for k in range(3):
        g = torch.randn(4, 6, generator=torch.Generator().manual_seed(k))
        p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert p.stride() == (1, 4), "the parameter must stay the tensor it was, layout included"


def test_state_dict_round_trip_and_torch_interop() -> None:
    """A resumed optimizer must continue bitwise; the checkpoint must load into torch's AdamW and back."""
    params = make_params(torch.bfloat16)
    opt = DeepSpeedCPUAdam(params, lr=1e-2, weight_decay=0.1)
    run(opt, params, range(3))
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and float(sd["state"][0]["step"]) == 3
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = DeepSpeedCPUAdam(resumed_params)
    resumed.load_state_dict(sd)
    assert all(s["exp_avg"].dtype == torch.float32 for s in resumed.state.values()), "fp32 moments rounded to bf16"
    assert_equal(run(opt, params, range(3, 5)), run(resumed, resumed_params, range(3, 5)))

    fp32 = make_params()
    ours = DeepSpeedCPUAdam(fp32, lr=1e-2, weight_decay=0.1)
    run(ours, fp32, range(3))
    theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in fp32]
    theirs = torch.optim.AdamW(theirs_params, fused=True)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # torch's load keeps references to the tensors
    back_params = [torch.nn.Parameter(p.detach().clone()) for p in fp32]
    back = DeepSpeedCPUAdam(back_params)
    back.load_state_dict(theirs.state_dict())
    expected = run(ours, fp32, range(3, 5))
    assert_equal(expected, run(theirs, theirs_params, range(3, 5)))
    assert_equal(expected, run(back, back_params, range(3, 5)))

    l2 = make_params()  # a torch Adam (L2 decay) checkpoint keeps L2 decay in DeepSpeedCPUAdam()
    torch_adam = torch.optim.Adam(l2, lr=1e-2, weight_decay=0.1)
    run(torch_adam, l2, range(3))
    into_params = [torch.nn.Parameter(p.detach().clone()) for p in l2]
    into = DeepSpeedCPUAdam(into_params)
    into.load_state_dict(torch_adam.state_dict())
    for x, y in zip(run(torch_adam, l2, range(3, 5)), run(into, into_params, range(3, 5))):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # foreach vs fused: fp32 rounding only


def test_device_params_refused() -> None:
    """A parameter not on the CPU is refused with a message that says why (meta stands in for cuda)."""
    with pytest.raises(ValueError, match="DeepSpeedCPUAdam steps CPU tensors.*parameter 1 of param group 0 is on meta"):
        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))])
    opt = DeepSpeedCPULion([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="DeepSpeedCPULion steps CPU tensors.*param group 1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]})


# ---------------------------------------------------------------- FusedAdam, Adagrad, Lion

@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_fused_adam_matches_torch(adam_w_mode: bool) -> None:
    hyper = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    torch_cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    opt = FusedAdam(p := make_params(), adam_w_mode=adam_w_mode, **hyper)
    assert_equal(run(opt, p), run(torch_cls(q := make_params(), fused=True, **hyper), q))
    opt.zero_grad()
    assert all(t.grad is None for t in p)
    keep = FusedAdam(r := make_params(), set_grad_none=False)
    run(keep, r, range(1))
    keep.zero_grad()
    assert all(t.grad is not None and not t.grad.any() for t in r)


def test_cpu_adagrad_matches_torch() -> None:
    hyper = dict(lr=0.1, eps=1e-10, weight_decay=0.05)
    assert_equal(run(DeepSpeedCPUAdagrad(p := make_params(), **hyper), p),
                 run(torch.optim.Adagrad(q := make_params(), fused=True, **hyper), q))
    with pytest.raises(ValueError, match="amsgrad"):
        DeepSpeedCPUAdagrad(make_params(), amsgrad=True)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # raised inside torch's sparse Adagrad
def test_cpu_adagrad_sparse_gradients() -> None:
    """Embedding-style sparse gradients go through torch's sparse Adagrad, with grad_scale applied."""
    p, q = (torch.nn.Parameter(torch.arange(12.0).reshape(4, 3)) for _ in range(2))
    opt, ref = DeepSpeedCPUAdagrad([p], lr=0.1), torch.optim.Adagrad([q], lr=0.1)
    for k in range(3):
        g = torch.sparse_coo_tensor([[k % 4, 3]], torch.randn(2, 3, generator=torch.Generator().manual_seed(k)),
                                    (4, 3), check_invariants=True)
        p.grad, q.grad = g * 4, g
        opt.step(grad_scale=4.0)
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)  # x4 then /4 is exact


def test_cpu_lion_matches_shardspeed_lion() -> None:
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    assert_equal(run(DeepSpeedCPULion(p := make_params(), **hyper), p), run(Lion(q := make_params(), **hyper), q))
    params = make_params(torch.bfloat16)
    opt = DeepSpeedCPULion(params, **hyper)
    ref = [torch.nn.Parameter(t.detach().float()) for t in params]
    ref_opt = Lion(ref, **hyper)
    for k in range(STEPS):
        for t, r, g in zip(params, ref, grads_for(k, torch.bfloat16)):
            t.grad, r.grad = g, g.float()
            r.data.copy_(t.detach())
        opt.step()
        ref_opt.step()
    assert_equal([t.detach() for t in params], [r.detach().bfloat16() for r in ref])
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert len(opt.state) == len(params), "fp32 working copies leaked into the optimizer state"


# ---------------------------------------------------------------- DeepSpeed's names

def test_deepspeed_import_paths_and_signatures() -> None:
    """`deepspeed.ops.*` imports must work unchanged, with DeepSpeed 0.19's parameter names and defaults."""
    from shardspeed.ops.adagrad import DeepSpeedCPUAdagrad as Adagrad
    from shardspeed.ops.adam import DeepSpeedCPUAdam as Adam, FusedAdam as Fused
    from shardspeed.ops.lion import DeepSpeedCPULion as CPULion

    def defaults(cls: type) -> dict[str, object]:
        return {k: v.default for k, v in list(inspect.signature(cls).parameters.items())[1:]}

    assert defaults(Adam) == dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                                  amsgrad=False, adamw_mode=True, fp32_optimizer_states=True)
    assert defaults(Fused) == dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                                   weight_decay=0.0, amsgrad=False, set_grad_none=True)
    assert defaults(Adagrad) == dict(lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False, fp32_optimizer_states=True)
    assert defaults(CPULion) == dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0, fp32_optimizer_states=True)
