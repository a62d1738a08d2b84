import pytest
import torch

from minwm.diffusion.losses import (add_noise, cd_indices, cd_pair, cfg_from_cond, cfg_from_uncond,
                                    critic_flow_matching_loss, dmd_generator_loss, dmd_gradient, euler_step,
                                    expand_to, flow_matching_target, velocity_from_x0, weighted_flow_matching_loss,
                                    x0_from_velocity)
from minwm.diffusion.schedule import sigma_grid
from minwm.errors import MinwmError


def test_noising_target_and_inversion_by_hand():
    x0 = torch.tensor([[1.0, -2.0]])
    eps = torch.tensor([[3.0, 4.0]])
    xt = add_noise(x0, eps, torch.tensor([0.25]))
    assert xt.tolist() == [[0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 4]]  # [1.5, -0.5]
    v = flow_matching_target(x0, eps)
    assert v.tolist() == [[2.0, 6.0]]
    assert torch.allclose(x0_from_velocity(xt, v, torch.tensor([0.25])), x0)
    assert torch.allclose(velocity_from_x0(xt, x0, torch.tensor([0.25])), v)
    # the velocity is the derivative of x_t in sigma
    assert torch.allclose(add_noise(x0, eps, 0.5) - add_noise(x0, eps, 0.25), 0.25 * v)


def test_per_frame_sigma_goes_on_the_frame_axis():
    x0 = torch.zeros(2, 3, 4, 1, 1)  # B C F H W
    eps = torch.ones_like(x0)
    sig = torch.tensor([[0.0, 0.1, 0.2, 0.3], [1.0, 0.9, 0.8, 0.7]])
    xt = add_noise(x0, eps, sig)
    assert torch.allclose(xt[:, 0, :, 0, 0], sig.float())
    with pytest.raises(MinwmError):
        expand_to(torch.ones(3), x0)
    with pytest.raises(MinwmError):
        expand_to(torch.ones(2, 5), x0)


def test_weighted_loss_by_hand():
    v = torch.zeros(2, 1, 2, 1, 2)
    target = torch.ones_like(v)
    target[1] = 2.0  # sample 1 error 4 per element
    # per-frame means: sample 0 -> [1, 1], sample 1 -> [4, 4]
    assert weighted_flow_matching_loss(v, target).item() == pytest.approx(2.5)
    assert weighted_flow_matching_loss(v, target, torch.tensor([2.0, 0.0])).item() == pytest.approx((2 + 2) / 4)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert weighted_flow_matching_loss(v, target, w).item() == pytest.approx((1 + 4) / 4)
    x0, eps = torch.zeros(1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1, 2)
    assert critic_flow_matching_loss(torch.ones_like(x0), x0, eps).item() == 0.0


def test_cfg_forms_are_distinct_and_named():
    c, u = torch.tensor([3.0]), torch.tensor([1.0])
    assert cfg_from_uncond(cond=c, uncond=u, scale=3.0).item() == 1 + 3 * 2  # 7
    assert cfg_from_cond(cond=c, uncond=u, scale=3.0).item() == 3 + 3 * 2  # 9
    assert cfg_from_uncond(cond=c, uncond=u, scale=1.0).item() == 3.0
    assert cfg_from_cond(cond=c, uncond=u, scale=0.0).item() == 3.0
    assert cfg_from_cond(cond=c, uncond=u, scale=2.0).item() == cfg_from_uncond(cond=c, uncond=u, scale=3.0).item()
    with pytest.raises(TypeError):
        cfg_from_uncond(c, u, 3.0)  # keyword-only: the branches cannot be swapped silently


def test_cd_pair_and_euler_step():
    sig = sigma_grid(4, 1.0)  # [1, .75, .5, .25]
    x0 = torch.tensor([[2.0], [4.0]])
    eps = torch.tensor([[-2.0], [0.0]])
    xt, s_t, s_n = cd_pair(x0, eps, sig, torch.tensor([0, 2]))
    assert s_t.tolist() == [1.0, 0.5] and s_n.tolist() == [0.75, 0.25]
    assert xt.tolist() == [[-2.0], [2.0]]
    v = torch.tensor([[1.0], [2.0]])
    assert euler_step(xt, v, s_t, s_n).tolist() == [[-2.0 - 0.25 * 1], [2.0 - 0.25 * 2]]
    # an exact velocity field lands on the exact next state
    exact = euler_step(xt, flow_matching_target(x0, eps), s_t, s_n)
    assert torch.allclose(exact, add_noise(x0, eps, s_n))
    idx = cd_indices(1000, 4, torch.Generator().manual_seed(0))
    assert int(idx.max()) == 2 and int(idx.min()) == 0
    with pytest.raises(MinwmError):
        cd_pair(x0, eps, sig, torch.tensor([3, 0]))


def test_dmd_gradient_normalisation_by_hand():
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    real = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # sample 1: x == real -> 0 denominator
    fake = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    g = dmd_gradient(x, fake, real)
    assert g.dtype == torch.float64
    # sample 0: mean|x - real| = (1 + 2)/2 = 1.5; (fake - real) = [2, 1]
    assert g[0].tolist() == pytest.approx([2 / 1.5, 1 / 1.5])
    assert torch.isfinite(g).all()  # 1/0 -> nan_to_num


def test_dmd_loss_gradient_equals_g_over_numel():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    g = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64)
    loss = dmd_generator_loss(x, g)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.5 * (g ** 2).mean().item())
    loss.backward()
    assert x.grad.dtype == torch.float32
    assert torch.allclose(x.grad.double(), g / x.numel(), atol=1e-9)
