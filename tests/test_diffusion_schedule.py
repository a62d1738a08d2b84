import math

import pytest
import torch

from minwm.diffusion.schedule import (FlowSchedule, dmd_timesteps, grid_indices, loss_weight_table, sampling_sigmas, shift_sigma,
                                      sigma_grid, timestep_grid, timesteps_for, warp_timesteps)
from minwm.errors import MinwmError


def test_shift_by_hand():
    # s u / (1 + (s - 1) u) with s = 5
    assert float(shift_sigma(0.5, 5.0)) == pytest.approx(2.5 / 3.0)
    assert float(shift_sigma(1.0, 5.0)) == 1.0 and float(shift_sigma(0.0, 5.0)) == 0.0
    assert float(shift_sigma(0.3, 1.0)) == pytest.approx(0.3)  # shift 1 is the identity


def test_grid_endpoints_and_dtype():
    g = timestep_grid(1000, 5.0)
    assert g.dtype == torch.float64 and len(g) == 1000
    assert float(g[0]) == 1000.0
    assert float(g[-1]) == pytest.approx(1000 * 5 * 0.001 / (1 + 4 * 0.001))  # 4.98
    assert float(g[-1]) == pytest.approx(4.98, abs=0.01)
    assert bool((g[1:] < g[:-1]).all())
    s = sampling_sigmas(4, 1.0)
    assert s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert sigma_grid(4, 1.0).tolist() == [1.0, 0.75, 0.5, 0.25]


def test_warped_few_step_list_exact():
    w = warp_timesteps([1000, 750, 500, 250], shift=5.0)
    assert w.dtype == torch.float64
    assert w[0].item() == 1000.0 and w[1].item() == 937.5 and w[3].item() == 625.0
    assert w[2].item() == pytest.approx(2500.0 / 3.0, abs=1e-9)
    assert warp_timesteps([0], 5.0).item() == 0.0
    with pytest.raises(MinwmError):
        warp_timesteps([1001], 5.0)
    with pytest.raises(MinwmError):
        warp_timesteps([12.5], 5.0)


def test_loss_weights():
    sched = FlowSchedule(1000, 5.0)
    w, t = sched.weights, sched.timesteps
    assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
    assert w[0].item() == 0.0  # t = 1000 has the smallest bell value
    i = int(w.argmax())
    assert abs(t[i].item() - 500) < 2.0
    assert w.max().item() == pytest.approx(2.08, abs=0.01)
    # Hand check of the formula on a 3-point grid: y = exp(-2((t-500)/1000)^2)
    tt = torch.tensor([1000.0, 500.0, 0.0], dtype=torch.float64)
    y = torch.exp(-2 * ((tt - 500) / 1000) ** 2)
    expect = (y - y.min()) * 3 / (y - y.min()).sum()
    assert torch.allclose(loss_weight_table(tt), expect)


def test_sample_indices_uniform_and_lookup():
    sched = FlowSchedule(10, 1.0)
    idx = sched.sample_indices(5000, torch.Generator().manual_seed(0))
    counts = torch.bincount(idx, minlength=10)
    assert counts.min() > 400 and int(idx.max()) == 9 and int(idx.min()) == 0
    s, t, w = sched.at(torch.tensor([0, 9]))
    assert s.tolist() == [1.0, pytest.approx(0.1)] and t[0].item() == 1000.0 and w.dtype == torch.float64


def test_dmd_timesteps_shift_and_clamp():
    t = dmd_timesteps(torch.tensor([0, 1, 500, 999]), shift=5.0)
    assert t[0].item() == 20.0 and t[1].item() == 20.0  # 1000*5e-3/(1.004) = 4.98 -> clamped
    assert t[2].item() == pytest.approx(1000 * 2.5 / 3.0)
    assert t[3].item() == 980.0


def test_timesteps_never_low_precision():
    like = torch.zeros(2, dtype=torch.bfloat16)
    t = timesteps_for([999.0, 997.0], like)
    assert t.dtype == torch.float32 and t.tolist() == [999.0, 997.0]
    # the pitfall this guards against: bf16 cannot tell these apart
    assert torch.tensor([999.0, 998.5]).bfloat16().unique().numel() == 1
    assert timesteps_for(5.0, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    assert math.isclose(float(timesteps_for(4.98, like)), 4.98, rel_tol=1e-6)


def test_student_steps_sit_on_the_48_step_teacher_grid():
    student = warp_timesteps([1000, 750, 500, 250], 5.0)
    assert grid_indices(student, timestep_grid(48, 5.0)) == [0, 12, 24, 36]
    with pytest.raises(MinwmError, match="not on the grid"):
        grid_indices([900.0], timestep_grid(48, 5.0))
