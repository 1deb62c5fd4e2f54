import copy

import torch

from lora_core import TrainConfig
from lora_core.optim import build_optimizer


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 5, generator=g)), torch.nn.Parameter(torch.randn(3, 8, 1, 1, generator=g))]


def _step_both(opt_a, a, opt_b, b, g, steps: int) -> None:
    """The same random gradients into both parameter lists, a step of each optimizer; then they must agree."""
    for _ in range(steps):
        for p, q in zip(a, b):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-6)


def test_adamw_is_fused_on_cpu_and_steps_like_the_reference_loop():
    config = TrainConfig(learning_rate=1e-2, weight_decay=1e-2)
    ours, ref = _params(0), _params(0)
    opt = build_optimizer([{"params": ours, "lr": 1e-2}], config)
    assert opt.defaults["fused"] is True  # one kernel per tensor, not ~10 Python-dispatched ops
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=config.betas, weight_decay=1e-2, foreach=False)
    g = torch.Generator().manual_seed(1)
    _step_both(opt, ours, ref_opt, ref, g, steps=5)
    # a state written by the for-loop optimizer (older checkpoints) loads into the fused one and continues alike
    again = _params(0)
    with torch.no_grad():
        for p, q in zip(again, ref):
            p.copy_(q)
    resumed = build_optimizer([{"params": again, "lr": 1e-2}], config)
    resumed.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # torch would share the tensors
    _step_both(resumed, again, ref_opt, ref, g, steps=2)
