import torch

from styledistill.jobs.train import flow
from styledistill.jobs.train.config import FlowConfig


def test_noise_velocity_round_trip_and_endpoints():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    sigma = torch.tensor([0.0, 0.37, 1.0])
    x = flow.add_noise(x0, noise, sigma)
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], noise[2])  # sigma 0 is data, 1 is noise
    v = flow.velocity(x0, noise)
    torch.testing.assert_close(flow.x0_from_velocity(x, sigma, v), x0)
    # An Euler step along the true velocity lands exactly on the path at the next sigma.
    s1 = torch.full((3,), 0.2)
    torch.testing.assert_close(x + (s1 - sigma).view(-1, 1, 1) * v, flow.add_noise(x0, noise, s1))


def test_sigma_sampling_shift_and_weights():
    g = torch.Generator().manual_seed(0)
    for sampling in ("uniform", "logit_normal"):
        s = flow.sample_sigmas(4000, FlowConfig(sampling=sampling, shift=3.0), g)
        assert s.min() > 0 and s.max() < 1 and s.mean() > 0.5  # shift 3 puts more time at high noise
    assert torch.allclose(flow.shift_sigma(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    assert torch.equal(flow.loss_weight(torch.rand(5), FlowConfig()), torch.ones(5))
    torch.testing.assert_close(flow.loss_weight(torch.tensor([0.5]), FlowConfig(weighting="sigma_sqrt")), torch.tensor([4.0]))


def test_pack_layout_and_normalisation():
    latents = torch.randn(2, 4, 1, 6, 10)
    tokens = flow.pack(latents)
    assert tokens.shape == (2, 3 * 5, 16)
    # Token (i, j) holds the 2x2 patch at rows 2i..2i+1, columns 2j..2j+1, channel-major.
    i, j = 1, 3
    patch = latents[:, :, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 16)
    torch.testing.assert_close(tokens[:, i * 5 + j], patch)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    normalised = flow.normalize_latents(latents, mean, std)
    torch.testing.assert_close(normalised[:, 1], (latents[:, 1] + 0.2) / 0.5)
