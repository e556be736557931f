"""ddim_sample: the loop against a hand-written reference loop, an end-to-end check on
Gaussian data whose exact denoiser is known, and CUDA-graph replay."""
import math

import pytest
import torch

from vqkernels.reference import ddim as reference
from vqkernels.sampling import DDIMScheduler, ddim_sample

T = 1000


class GaussianDenoiser(torch.nn.Module):
    """The exact epsilon-predictor for data x0 ~ N(mu, sigma^2), independently per dimension.

    x_t = sqrt(a) x0 + sqrt(1 - a) eps is Gaussian, so E[eps | x_t] =
    sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a).
    """

    def __init__(self, mu, sigma, table):
        super().__init__()
        self.mu, self.var, self.table = mu, sigma ** 2, table

    def forward(self, x, t):
        a = self.table.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))
        mu, var = self.mu.to(x.device), self.var.to(x.device)
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * var + 1 - a)
        return eps.to(x.dtype)


def ddim_chain_moments(mu, sigma, table, timesteps, eta, final=1.0):
    """Exact per-dimension mean and std of DDIM with the exact denoiser, from x_T ~ N(0, 1).

    Each step is affine in x_t plus independent noise: prev = A x + B + std z, so
    the moments follow m' = A m + B, v' = A^2 v + std^2.
    """
    n = len(timesteps)
    m, v = torch.zeros_like(mu), torch.ones_like(mu)
    var = sigma ** 2
    for t in timesteps.tolist():
        a = table[t].item()
        prev_t = t - T // n
        a_p = table[prev_t].item() if prev_t >= 0 else final
        k = math.sqrt(1 - a) / (a * var + 1 - a)  # eps_hat = k (x - sqrt(a) mu)
        std = eta * math.sqrt((1 - a_p) / (1 - a) * (1 - a / a_p))
        direction = math.sqrt(max(1 - a_p - std ** 2, 0.0))
        slope = math.sqrt(a_p) * (1 - math.sqrt(1 - a) * k) / math.sqrt(a) + direction * k
        offset = (math.sqrt(a_p) * math.sqrt(1 - a) * k - direction * k * math.sqrt(a)) * mu
        m, v = slope * m + offset, slope ** 2 * v + std ** 2
    return m, v.sqrt()


# The interpreter is slow (Philox most of all): fewer samples, eta 0 only.
CASES = [pytest.param("cpu", 2048, 0.0, id="cpu-eta0"), pytest.param("cpu", 2048, 1.0, id="cpu-eta1"),
         pytest.param("triton", 64, 0.0, id="triton-interp-eta0", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend,batch,eta", CASES)
def test_gaussian_data_is_reproduced(backend, batch, eta, generator):
    dims = (4, 4, 4)
    mu = (torch.rand(dims, generator=generator, dtype=torch.float64) * 2 - 1)
    sigma = torch.rand(dims, generator=generator, dtype=torch.float64) * 1.2 + 0.3
    scheduler = DDIMScheduler(clip_sample=False)
    table = reference.alphas_cumprod(reference.betas_for_schedule())  # float64 truth
    model = GaussianDenoiser(mu, sigma, table)
    x = ddim_sample(model, (batch, *dims), num_steps=50, eta=eta, generator=generator,
                    scheduler=scheduler, progress=False, backend=backend).double()
    scheduler.set_timesteps(50)
    m, s = ddim_chain_moments(mu, sigma, table, scheduler.timesteps, eta)
    # DDIM's discretisation bias on this data, exact from the moment recursion: with
    # the posterior-mean denoiser a 20-timestep stride shrinks the std (by up to 8%
    # at eta 0, 16% at eta 1, for sigma = 0.3); the means are nearly unbiased.
    bias_mean = (m - mu).abs().max().item()
    bias_std = ((s - sigma) / sigma).abs().max().item()
    assert bias_mean < 0.02 and bias_std < 0.2, (bias_mean, bias_std)
    # Empirical moments against the exact chain: z-scores pooled over all n values.
    n = x.numel()
    z = (x - m) / s
    assert abs(z.mean().item()) < 5 / math.sqrt(n), z.mean()
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n), z.std()
    # ...and so against the data, within the sampling error plus the exact bias.
    data_z = (x - mu) / sigma
    assert abs(data_z.mean().item()) < 5 / math.sqrt(n) + bias_mean / sigma.min().item()
    assert abs(data_z.std().item() - 1) < 5 / math.sqrt(2 * n) + bias_std


class ToyDiT(torch.nn.Module):
    """Class-conditional, learned-sigma toy model: out (B, 2C, ...) from x, t and y."""

    num_classes = 5

    def __init__(self, channels, generator):
        super().__init__()
        self.mix = torch.randn(2 * channels, channels, generator=generator) / channels
        self.label = torch.randn(self.num_classes + 1, 2 * channels, generator=generator)

    def forward(self, x, t, y):
        out = torch.einsum("oc,bc...->bo...", self.mix.to(x), x)
        out = out + (t.to(x) / T).view(-1, 1, *([1] * (x.dim() - 2)))
        return out + self.label.to(x)[y].view(*y.shape, -1, *([1] * (x.dim() - 2)))


def reference_loop(model, x, labels, scheduler, *, guidance_scale, eta, seeds, channels):
    """The same sampling written with the reference functions only."""
    table, final = scheduler.alphas_cumprod.double(), float(scheduler.final_alpha_cumprod)
    n = scheduler.num_inference_steps
    y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    for i, t in enumerate(scheduler.timesteps.tolist()):
        out = model(torch.cat([x, x]), torch.full((2 * len(x),), t), y)
        eps = reference.cfg_combine_batched(out, guidance_scale, channels)[:, :x.shape[1]]
        noise = reference.philox_normal(int(seeds[i]), torch.arange(x.numel())).view(x.shape)
        x, _ = reference.ddim_step(eps, t, x, table, final, num_inference_steps=n, eta=eta,
                                   variance_noise=noise)
    return x


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cfg_loop_equals_reference_loop(backend, generator):
    c, shape = 4, (3, 4, 6, 6)
    model = ToyDiT(c, generator)
    labels = torch.tensor([0, 4, 2])
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=generator))
    kw = dict(num_steps=20, guidance_scale=4.0, eta=0.5, class_labels=labels,
              guidance_channels=3, progress=False)
    got = ddim_sample(model, shape, generator=torch.Generator().manual_seed(seed),
                      scheduler=DDIMScheduler(clip_sample=False), backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    seeds = torch.randint(0, 2 ** 62, (20,), generator=g)
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(20)
    want = reference_loop(model, x.double(), labels, scheduler, guidance_scale=4.0, eta=0.5,
                          seeds=seeds, channels=3)
    err = (got.double() - want).abs().max().item()
    assert err < 1e-4 * max(want.abs().max().item(), 1), err


def test_validation():
    model = GaussianDenoiser(torch.zeros(3), torch.ones(3), torch.ones(T))
    with pytest.raises(ValueError, match="num_steps"):
        ddim_sample(model, (2, 3), num_steps=0, progress=False)
    with pytest.raises(ValueError, match="class_labels"):
        ddim_sample(model, (2, 3), guidance_scale=4.0, progress=False)
    with pytest.raises(ValueError, match="cuda_graph"):
        ddim_sample(model, (2, 3), cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="latents"):
        ddim_sample(model, (2, 3), latents=torch.zeros(2, 4), progress=False)
    with pytest.raises(ValueError, match="null_class_label"):
        ddim_sample(model, (2, 3), guidance_scale=2.0, class_labels=torch.tensor([0, 1]),
                    progress=False)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cuda_graph_equals_eager(backend, eta):
    model = ToyDiT(4, torch.Generator().manual_seed(0)).cuda()
    model.mix, model.label = model.mix.cuda(), model.label.cuda()
    kw = dict(num_steps=25, guidance_scale=3.0, eta=eta, class_labels=torch.tensor([1, 3]).cuda(),
              device="cuda", progress=False, backend=backend)
    eager = ddim_sample(model, (2, 4, 8, 8), generator=torch.Generator("cuda").manual_seed(7), **kw)
    graph = ddim_sample(model, (2, 4, 8, 8), generator=torch.Generator("cuda").manual_seed(7),
                        cuda_graph=True, **kw)
    torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    assert eager.isfinite().all()


@pytest.mark.cuda
def test_gaussian_data_on_cuda_with_graph():
    mu, sigma = torch.linspace(-1, 1, 16, dtype=torch.float64), torch.full((16,), 0.5, dtype=torch.float64)
    table = reference.alphas_cumprod(reference.betas_for_schedule())
    model = GaussianDenoiser(mu.cuda(), sigma.cuda(), table.cuda())
    x = ddim_sample(model, (65536, 16), num_steps=50, device="cuda", cuda_graph=True,
                    generator=torch.Generator("cuda").manual_seed(1), progress=False).double().cpu()
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(50)
    m, s = ddim_chain_moments(mu, sigma, table, scheduler.timesteps, 0.0)
    z = (x - m) / s
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.std().item() - 1) < 5 / math.sqrt(2 * n)
