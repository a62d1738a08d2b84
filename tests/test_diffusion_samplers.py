import pytest
import torch

from minwm.diffusion.losses import flow_matching_target
from minwm.diffusion.samplers import consistency_sample, euler_sample, euler_sigmas, unipc_sample
from minwm.diffusion.self_rollout import sample_exit_index, self_rollout


def _exact_velocity(x0):
    # For data concentrated at x0 the flow velocity at x_t is (x_t - x0) / sigma = eps - x0 exactly.
    return lambda x, t: (x - x0) / (t / 1000.0)


def test_euler_recovers_point_mass():
    x0 = torch.tensor([[1.0, -2.0, 0.5]])
    noise = torch.tensor([[0.3, 0.1, -1.0]])
    seen = []
    out = euler_sample(_exact_velocity(x0), noise, euler_sigmas(8, 5.0), callback=lambda i, t, x: seen.append(t))
    assert torch.allclose(out, x0, atol=1e-5)
    assert seen[0] == 1000.0 and len(seen) == 8 and all(a > b for a, b in zip(seen, seen[1:]))


def test_euler_linear_path_is_exact_for_constant_velocity():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    v = flow_matching_target(x0, eps)
    assert torch.allclose(euler_sample(lambda x, t: v, eps, euler_sigmas(3, 3.0)), x0, atol=1e-6)


def test_unipc_flow_matching_with_shift():
    x0 = torch.tensor([[1.0, -2.0, 0.5]])
    noise = torch.tensor([[0.3, 0.1, -1.0]])
    ts = []

    def v(x, t):
        ts.append(t)
        return noise - x0  # constant field: straight path from noise to x0

    out = unipc_sample(v, noise, num_steps=10, shift=5.0)
    assert torch.allclose(out, x0, atol=1e-4)
    assert len(ts) == 10 and ts[0] == pytest.approx(1000.0, abs=1e-2) and isinstance(ts[1], float)
    # shifted grid: the second timestep is shift_5(1 - 0.0999) ~ 978, not the unshifted ~900
    assert 970 < ts[1] < 985


def test_consistency_sampler_renoises_with_fresh_noise():
    calls = []
    draws = iter([torch.full((1, 2), 10.0), torch.full((1, 2), 20.0)])

    def g(x, t):
        calls.append((t, x.clone()))
        return torch.full_like(x, 1.0)  # always predicts x0 = 1

    out = consistency_sample(g, torch.zeros(1, 2), [1000.0, 750.0, 500.0], noise_fn=lambda ref: next(draws))
    assert out.tolist() == [[1.0, 1.0]]
    assert [c[0] for c in calls] == [1000.0, 750.0, 500.0]
    # second input = (1 - .75) * 1 + .75 * 10; third = .5 * 1 + .5 * 20
    assert calls[1][1].tolist() == [[0.25 + 7.5, 0.25 + 7.5]]
    assert calls[2][1].tolist() == [[0.5 + 10.0, 0.5 + 10.0]]


class ToyGenerator(torch.nn.Module):
    """x0_hat = a * x + b * (t / 1000) + c * cache; records whether grad was on for each call."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.b = torch.nn.Parameter(torch.tensor(0.25))
        self.c = torch.nn.Parameter(torch.tensor(0.1))
        self.cache = torch.zeros(())
        self.calls = []

    def forward(self, x, t, block):
        self.calls.append((block, t, torch.is_grad_enabled()))
        out = self.a * x + self.b * (t / 1000.0) + self.c * self.cache
        if t == 0.0:
            self.cache = out.detach().mean()  # clean K/V write; tests check it carries no graph
        return out


def test_self_rollout_gradient_only_through_exit_step():
    torch.manual_seed(0)
    gen = ToyGenerator()
    ts = [1000.0, 750.0, 500.0, 250.0]
    noise = [torch.randn(1, 3) for _ in range(3)]
    fresh = [torch.randn(1, 3) for _ in range(20)]
    it = iter(fresh)
    outs = self_rollout(gen, noise, ts, exit_index=2, noise_fn=lambda ref: next(it))
    # per block: steps 0,1 no grad, step 2 grad, then t=0 refresh without grad (not after the last block)
    expect = []
    for b in range(3):
        expect += [(b, 1000.0, False), (b, 750.0, False), (b, 500.0, True)]
        if b < 2:
            expect.append((b, 0.0, False))
    assert gen.calls == expect
    assert all(o.requires_grad for o in outs)
    assert not gen.cache.requires_grad

    # The gradient equals the one of the exit step alone, with its input and the cache treated as constants.
    loss = sum(o.sum() for o in outs)
    loss.backward()
    grads = [p.grad.clone() for p in (gen.a, gen.b, gen.c)]
    gen2 = ToyGenerator()
    gen2.load_state_dict(gen.state_dict())
    gen2.zero_grad()
    it2 = iter(fresh)
    cache = torch.zeros(())
    total = 0.0
    for b in range(3):
        with torch.no_grad():
            gen2.cache = cache
            x = noise[b]
            for k in range(2):
                x0 = gen2(x, ts[k], b)
                s = ts[k + 1] / 1000
                x = (1 - s) * x0 + s * next(it2)
        gen2.cache = cache
        x0 = gen2(x.detach(), ts[2], b)  # only this call builds a graph
        total = total + x0.sum()
        with torch.no_grad():
            cache = (gen2.a * x0 + gen2.b * 0 + gen2.c * cache).mean()
    total.backward()
    for g1, p in zip(grads, (gen2.a, gen2.b, gen2.c)):
        assert torch.allclose(g1, p.grad)
    # A rollout that keeps grad on every step (the bug this guards against) gives a different gradient.
    gen3 = ToyGenerator()
    gen3.load_state_dict(gen.state_dict())
    it3 = iter(fresh)
    total3 = 0.0
    for b in range(3):
        x = noise[b]
        for k in range(2):
            s = ts[k + 1] / 1000
            x = (1 - s) * gen3(x, ts[k], b) + s * next(it3)
        x0 = gen3(x, ts[2], b)
        total3 = total3 + x0.sum()
        gen3.cache = (gen3.a * x0 + gen3.c * gen3.cache).mean()
    total3.backward()
    assert not torch.allclose(grads[0], gen3.a.grad)


def test_self_rollout_without_grad_and_exit_zero():
    gen = ToyGenerator()
    with torch.no_grad():
        outs = self_rollout(gen, [torch.ones(1, 2), torch.ones(1, 2)], [1000.0, 500.0], exit_index=0,
                            rng=torch.Generator().manual_seed(0), refresh_last=True)
    assert not outs[0].requires_grad
    assert gen.calls == [(0, 1000.0, False), (0, 0.0, False), (1, 1000.0, False), (1, 0.0, False)]
    g = torch.Generator().manual_seed(3)
    draws = {sample_exit_index(4, g) for _ in range(200)}
    assert draws == {0, 1, 2, 3}
