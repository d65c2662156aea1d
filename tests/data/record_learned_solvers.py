"""Record the authors' AMED-Solver, EPD-Solver and PAS samplers on an exact Gaussian-mixture
denoiser, for ``tests/test_learned_solvers.py`` (which cannot import their code)::

    python tests/data/record_learned_solvers.py --amed DIR --epd DIR --pas DIR [--out tests/data/learned_solvers.npz]

``--amed``: zju-pi/diff-sampler's ``amed-solver-main`` folder; ``--epd``: BeierZhu/EPD at its
``EPD-Solver`` branch (the ICCV 2025 code); ``--pas``: onefly123/PAS. This script holds none of
their code: it imports their sampler and predictor modules from those folders and runs them in
float64 on a mixture of Gaussians whose posterior mean it computes itself (VE / EDM coordinates,
x = x0 + sigma eps, data [B, 2, 8, 8] flattened in NHWC order), wrapped as an EDM-style
``net(x, sigma)`` whose ``model.enc['8x8_block3']`` (the module their hooks read as the U-Net
bottleneck) sees the current direction (x - D) / sigma. See ``tests/data/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

import numpy as np
import torch

SHAPE = (2, 8, 8)  # C, H, W
BATCH = 4
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


class MixtureNet(torch.nn.Module):
    """D(x; sigma) of a Gaussian mixture (diagonal covariances) as an EDM network, NCHW; records calls."""

    def __init__(self, weights, means, variances):
        super().__init__()
        self.log_w = torch.log(torch.as_tensor(weights))
        self.mu = torch.as_tensor(means)
        self.var = torch.as_tensor(variances)
        self.img_channels, self.img_resolution = SHAPE[0], SHAPE[1]
        self.label_dim = 0
        self.sigma_min, self.sigma_max = SIGMA_MIN, SIGMA_MAX
        self.model = torch.nn.Module()
        self.model.enc = torch.nn.ModuleDict({"8x8_block3": torch.nn.Identity()})
        self.calls = []

    def forward(self, x, sigma, class_labels=None, **kwargs):
        b = x.shape[0]
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
        s = s.expand(b) if s.numel() == 1 else s
        flat = x.permute(0, 2, 3, 1).reshape(b, -1)
        var_t = self.var[None] + s[:, None, None] ** 2
        diff = flat[:, None, :] - self.mu[None]
        log_p = -0.5 * (diff**2 / var_t + torch.log(var_t)).sum(-1) + self.log_w
        resp = torch.softmax(log_p, dim=-1)
        post = self.mu[None] + self.var[None] / var_t * diff
        data = torch.einsum("bk,bkd->bd", resp, post).reshape(b, SHAPE[1], SHAPE[2], SHAPE[0]).permute(0, 3, 1, 2)
        self.model.enc["8x8_block3"]((x - data) / s.reshape(b, 1, 1, 1))
        self.calls.append((x.detach().clone(), s.detach().clone()))
        return data


@contextlib.contextmanager
def repository(path: str, modules: tuple):
    """Import ``modules`` from ``path``; forget them (and the folder) afterwards, since the three
    repositories reuse module names (solver_utils, training, torch_utils)."""
    sys.path.insert(0, path)
    before = set(sys.modules)
    try:
        yield [importlib.import_module(m) for m in modules]
    finally:
        sys.path.remove(path)
        for name in set(sys.modules) - before:
            del sys.modules[name]


def nhwc(a):
    a = a.detach().numpy()
    return np.moveaxis(a, -3, -1)


def layer(out, prefix, lin):
    out[prefix + "_kernel"] = lin.weight.detach().numpy().T.copy()  # [in, out]
    out[prefix + "_bias"] = lin.bias.detach().numpy().copy()


def run(sampler, utils, net, latents, c, name, out, **predictor):
    """One of their EDM-style samplers on case ``c``: its grid and every state, into ``out``."""
    kwargs = dict(num_steps=c["num_steps"], sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, schedule_type=c["schedule_type"],
                  schedule_rho=7, afs=c["afs"])
    with torch.no_grad():
        traj = sampler(net, latents, return_inters=True, **predictor, **kwargs)
    out[name + "__t_steps"] = utils.get_schedule(c["num_steps"], SIGMA_MIN, SIGMA_MAX,
                                                 schedule_type=c["schedule_type"], schedule_rho=7).numpy()
    out[name + "__traj"] = nhwc(traj)


def record_amed(path, net, latents, out):
    cases = dict(
        amed_afs=dict(num_steps=4, schedule_type="polynomial", afs=True, scale_dir=0.01, scale_time=0.2, seed=1),
        amed_plain=dict(num_steps=3, schedule_type="logsnr", afs=False, scale_dir=0.05, scale_time=0.0, seed=2),
    )
    with repository(path, ("solvers_amed", "solver_utils", "training.networks")) as (solvers, utils, networks):
        for name, c in cases.items():
            torch.manual_seed(c["seed"])
            pred = networks.AMED_predictor(num_steps=c["num_steps"], sampler_stu="amed", sampler_tea="heun",
                                           schedule_type=c["schedule_type"], schedule_rho=7, afs=c["afs"],
                                           scale_dir=c["scale_dir"], scale_time=c["scale_time"])
            with torch.no_grad():  # heads drawn larger than their init, so that r and the scales vary
                for head in ("fc_r", "fc_scale_dir", "fc_scale_time"):
                    if hasattr(pred, head):
                        getattr(pred, head).weight.mul_(3.0)
                        getattr(pred, head).bias.normal_(0.0, 0.5)
            run(solvers.amed_sampler, utils, net, latents, c, name, out, AMED_predictor=pred)
            out[name + "__options"] = np.array([c["afs"], c["scale_dir"], c["scale_time"]], np.float64)
            for mine, theirs in (("map", "map_layer0"), ("enc0", "enc_layer0"), ("enc1", "enc_layer1"),
                                 ("r", "fc_r"), ("scale_dir", "fc_scale_dir"), ("scale_time", "fc_scale_time")):
                if hasattr(pred, theirs):
                    layer(out, f"{name}__{mine}", getattr(pred, theirs))


def record_epd(path, net, latents, out):
    cases = dict(
        epd_afs=dict(num_points=2, num_steps=4, schedule_type="polynomial", afs=True, scale_dir=0.05,
                     scale_time=0.05, seed=3),
        epd_three=dict(num_points=3, num_steps=3, schedule_type="logsnr", afs=False, scale_dir=0.02,
                       scale_time=0.0, seed=4),
    )
    with repository(path, ("solvers", "solver_utils", "training.networks")) as (solvers, utils, networks):
        for name, c in cases.items():
            torch.manual_seed(c["seed"])
            pred = networks.EPD_predictor(num_points=c["num_points"], num_steps=c["num_steps"], sampler_stu="epd",
                                          sampler_tea="heun", schedule_type=c["schedule_type"], schedule_rho=7,
                                          afs=c["afs"], scale_dir=c["scale_dir"], scale_time=c["scale_time"])
            run(solvers.epd_sampler, utils, net, latents, c, name, out, predictor=pred)
            out[name + "__options"] = np.array([c["num_points"], c["afs"], c["scale_dir"], c["scale_time"]],
                                               np.float64)
            for key in ("r_params", "weight_s", "scale_dir_params", "scale_time_params"):
                out[f"{name}__{key}"] = getattr(pred, key).detach().numpy().copy()


def exact_pca(original, niter):
    """torch.pca_lowrank with more subspace iterations: its randomized result is then the exact
    leading principal directions (with the default niter=2 it depends on torch's random state)."""
    return lambda a, q=None, center=True, **_: original(a, q=q, center=center, niter=niter)


def record_pas(path, net, latents, out):
    t_steps = None
    cases = dict(
        pas_ddim=dict(sampler="euler_sampler", pca=4, xt="yes", steps={2: 0, 4: 1, 5: 2}, num_steps=7),
        pas_ipndm=dict(sampler="ipndm_sampler", pca=3, xt="no", steps={2: 0, 3: 1, 5: 2}, num_steps=7,
                       max_order=3),
        pas_deis=dict(sampler="deis_sampler", pca=2, xt="yes", steps={1: 0, 3: 1}, num_steps=6, max_order=3),
    )
    with repository(path, ("pas_solvers", "solver_utils")) as (solvers, utils):
        original = torch.pca_lowrank
        torch.pca_lowrank = exact_pca(original, 30)
        try:
            for name, c in cases.items():
                gen = torch.Generator().manual_seed(len(name))
                n = c["num_steps"] - 1
                t_steps = utils.get_schedule(c["num_steps"], SIGMA_MIN, SIGMA_MAX, schedule_type="polynomial",
                                             schedule_rho=7)
                coords = np.zeros((n, c["pca"]))
                corrected = np.zeros(n)
                for step in c["steps"]:
                    values = 0.3 * torch.randn(c["pca"], generator=gen)
                    values[0] += 11.0  # about |d| = |eps| for 128 values
                    coords[step] = values.numpy()
                    corrected[step] = 1.0
                coordinates = {s: torch.as_tensor(coords[s]) for s in c["steps"]}
                kwargs = dict(num_steps=c["num_steps"], sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                              schedule_type="polynomial", schedule_rho=7, t_steps=t_steps, model_source="edm")
                if "max_order" in c:
                    kwargs["max_order"] = c["max_order"]
                if c["sampler"] == "deis_sampler":  # 3-node variable-step Adams in sigma (their rhoAB)
                    kwargs["coeff_list"] = utils.get_deis_coeff_list(t_steps, c["max_order"] - 1, deis_mode="rhoab")
                net.calls.clear()
                with torch.no_grad():
                    final = getattr(solvers, c["sampler"])(coordinates, c["pca"], c["xt"], net, latents, **kwargs)
                states = torch.stack([x for x, _ in net.calls] + [final])
                out[name + "__t_steps"] = t_steps.numpy()
                out[name + "__traj"] = nhwc(states)
                out[name + "__coordinates"] = coords
                out[name + "__corrected"] = corrected
                out[name + "__options"] = np.array([c["pca"], c["xt"] == "yes", c.get("max_order", 1)], np.float64)
                # the spread of their default randomized PCA (niter=2) against the exact directions
                torch.pca_lowrank = original
                net.calls.clear()
                with torch.no_grad():
                    final2 = getattr(solvers, c["sampler"])(coordinates, c["pca"], c["xt"], net, latents, **kwargs)
                torch.pca_lowrank = exact_pca(original, 30)
                spread = float((final2 - final).abs().max() / final.abs().max())
                print(f"{name}: their default PCA (niter=2) moves the result by {spread:.2e} relative")
        finally:
            torch.pca_lowrank = original


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amed", required=True)
    parser.add_argument("--epd", required=True)
    parser.add_argument("--pas", required=True)
    parser.add_argument("--out", default="tests/data/learned_solvers.npz")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(0)
    k, d = 4, int(np.prod(SHAPE))
    weights = rng.uniform(0.5, 1.5, k)
    weights /= weights.sum()
    means = rng.normal(0.0, 1.0, (k, d)) * 3 / np.sqrt(d) * 4
    variances = rng.uniform(0.05, 0.3, (k, d))
    net = MixtureNet(weights, means, variances)
    latents = torch.as_tensor(rng.standard_normal((BATCH, *SHAPE)))
    out = dict(gmm_weights=weights, gmm_means=means, gmm_variances=variances, latents=nhwc(latents),
               versions=np.array([torch.__version__]))
    record_amed(args.amed, net, latents, out)
    record_epd(args.epd, net, latents, out)
    record_pas(args.pas, net, latents, out)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {', '.join(sorted(out))}")


if __name__ == "__main__":
    main()
