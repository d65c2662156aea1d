"""Train the bundled ``digits`` model: a class-conditional EDM-preconditioned SongUNet on
scikit-learn's 8x8 digits, with the EDM paper's loss (Karras et al. 2022).

    python examples/train_digits.py                      # the shipped model (~15-20 min, 2 cores)
    python examples/train_digits.py --smoke              # a few steps of a tiny net (CI)

Data: ``sklearn.datasets.load_digits`` (1797 images, 10 classes, values 0..16), scaled to
[-1, 1], NHWC ``[N, 8, 8, 1]``. Loss: ``sigma = exp(P_mean + P_std * n)`` with ``P_mean=-1.2``,
``P_std=1.2``, weight ``(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``, ``sigma_data=0.5``.
Class labels are one-hot, replaced by zeros with probability ``--label-dropout`` (so the model
also learns the unconditional denoiser that classifier-free guidance needs). Adam with a linear
warm-up, an exponential moving average (EMA) of the weights, and Orbax checkpoints every
``--ckpt-every`` steps under ``--workdir``: rerunning the same command resumes from the latest.

At the end the bias-corrected EMA weights are written with :func:`jdiffsample.nets.save` to ``--out``
(default: the package's ``jdiffsample/assets/digits``), with the training summary (steps, wall
time, final loss) in ``config.json["training"]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiffsample import metrics, nets
from jdiffsample.nets import edm

ASSET = Path(__file__).resolve().parents[1] / "jdiffsample" / "assets" / "digits"

CLASS_NAME = "EDMPrecond"
#: The shipped network: 8x8 -> 4x4, one block per resolution, attention at 4x4 (small, so that
#: training fits 20 minutes of 2 shared CPU cores and the eval suite can afford many cells).
KWARGS = dict(img_resolution=8, img_channels=1, label_dim=10, sigma_data=0.5,
              model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4], dropout=0.0, embedding_type="positional",
              channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
              resample_filter=[1, 1])
#: The CI network: as small as SongUNet allows.
SMOKE_KWARGS = dict(KWARGS, model_channels=8, attn_resolutions=[])

P_MEAN, P_STD = -1.2, 1.2


def edm_loss(module, params, skip, x, labels, key, label_dropout: float):
    """The EDM training loss (mean over the batch) of ``module`` on clean images ``x``."""
    k_sigma, k_noise, k_drop = jax.random.split(key, 3)
    batch = x.shape[0]
    sigma = jnp.exp(P_MEAN + P_STD * jax.random.normal(k_sigma, (batch, 1, 1, 1)))
    sd = module.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    onehot = jax.nn.one_hot(labels, module.label_dim)
    keep = jax.random.uniform(k_drop, (batch, 1)) >= label_dropout
    onehot = onehot * keep
    noisy = x + sigma * jax.random.normal(k_noise, x.shape)
    denoised = module.apply({"params": params, "skip": skip}, noisy, sigma.reshape(-1), onehot)
    return jnp.mean(weight * (denoised - x) ** 2)


def make_step(module, optimizer, label_dropout: float, ema_decay: float):
    """One jitted training step ``(state, x, labels, key) -> (state, loss)``."""

    def step(state, x, labels, key):
        loss, grads = jax.value_and_grad(edm_loss, argnums=1)(
            module, state["params"], state["skip"], x, labels, key, label_dropout)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params)
        return dict(state, params=params, opt_state=opt_state, ema=ema,
                    step=state["step"] + 1), loss

    return jax.jit(step, donate_argnums=0)


def init_state(module, optimizer, key):
    """Fresh training state (jitted init: eager Flax init of a UNet is slow)."""
    res, ch = module.img_resolution, module.img_channels

    @jax.jit
    def init(key):
        variables = module.init(key, jnp.zeros((1, res, res, ch)), jnp.ones((1,)),
                                jnp.zeros((1, module.label_dim)))
        params = variables["params"]
        return dict(params=params, skip=variables["skip"], ema=params,
                    opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    return init(key)


def debiased_ema(ema, initial, decay: float, steps: int):
    """The EMA without its starting point: ``ema = d^T p_0 + (1 - d) sum_k d^(T-k) p_k``, so
    ``(ema - d^T p_0) / (1 - d^T)`` is a proper weighted average of the trained weights (after
    1500 steps at d = 0.999 the raw EMA still holds 22% of the random initialisation)."""
    w = decay**steps
    return jax.tree.map(lambda e, p: (e - w * p) / (1 - w), ema, initial)


class Progress:
    """A one-line progress bar on stderr (tqdm when installed)."""

    def __init__(self, total: int, initial: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             mininterval=2.0)
        except ImportError:
            self._bar = None
        self.total, self.n, self._last = total, initial, 0.0

    def update(self, n: int, loss: float) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.update(n)
        elif time.time() - self._last > 5 or self.n == self.total:
            self._last = time.time()
            print(f"\rstep {self.n}/{self.total}  loss {loss:.4f}", end="", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


def train(args) -> dict:
    import orbax.checkpoint as ocp

    kwargs = SMOKE_KWARGS if args.smoke else KWARGS
    module = edm.build(CLASS_NAME, kwargs)
    images, labels = metrics.real_digits(np.float32)
    n = images.shape[0]
    schedule = optax.linear_schedule(0.0, args.lr, max(1, args.warmup))
    optimizer = optax.adam(schedule)
    step_fn = make_step(module, optimizer, args.label_dropout, args.ema)

    key = jax.random.key(args.seed)
    key, init_key = jax.random.split(key)
    state = init_state(module, optimizer, init_key)
    # the EMA's starting point, for its bias correction (a copy: training steps donate `state`)
    initial = jax.tree.map(jnp.copy, state["params"])
    workdir = Path(args.workdir).absolute()
    manager = ocp.CheckpointManager(workdir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True))
    elapsed_before, history = 0.0, []
    if manager.latest_step() is not None:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
        elapsed_before, history = meta["elapsed"], meta["history"]
        print(f"resumed from step {int(state['step'])} in {workdir}", file=sys.stderr)

    def checkpoint(elapsed):
        manager.save(int(state["step"]), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(dict(elapsed=elapsed, history=history))))

    rng = np.random.default_rng([args.seed, int(state["step"])])
    start = time.perf_counter()
    bar = Progress(args.steps, int(state["step"]))
    window = []
    while int(state["step"]) < args.steps:
        idx = rng.integers(0, n, args.batch)
        key, sub = jax.random.split(jax.random.fold_in(key, int(state["step"])))
        state, loss = step_fn(state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), sub)
        step = int(state["step"])
        window.append(loss)  # a device array: no host sync until the log line
        if step % args.log_every == 0 or step == args.steps:
            history.append([step, float(np.mean(jnp.stack(window)))])
            bar.update(len(window), history[-1][1])
            window = []
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint(elapsed_before + time.perf_counter() - start)
    manager.wait_until_finished()
    manager.close()
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - start

    summary = dict(steps=int(state["step"]), batch=args.batch, lr=args.lr, warmup=args.warmup,
                   ema=args.ema, label_dropout=args.label_dropout, seed=args.seed,
                   seconds=round(elapsed, 1), final_loss=history[-1][1] if history else None,
                   first_loss=history[0][1] if history else None,
                   loss_history=history, data="sklearn.datasets.load_digits, scaled to [-1, 1]",
                   loss=f"EDM (P_mean={P_MEAN}, P_std={P_STD}, sigma_data={module.sigma_data})")
    if args.out:
        variables = dict(params=debiased_ema(state["ema"], initial, args.ema, int(state["step"])),
                         skip=state["skip"])
        path = nets.save(args.out, "edm", CLASS_NAME, kwargs, variables, overwrite=True,
                         extra=dict(training=summary,
                                    source=dict(kind="trained", script="examples/train_digits.py")))
        print(f"saved the EMA weights to {path}", file=sys.stderr)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500; smoke 30)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; smoke 32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 200; smoke 5)")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights")
    parser.add_argument("--label-dropout", type=float, default=0.1, help="probability of dropping the label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None, help="loss averaging window (default 50; smoke 5)")
    parser.add_argument("--ckpt-every", type=int, default=500, help="Orbax checkpoint interval")
    parser.add_argument("--workdir", default="runs/train_digits", help="Orbax checkpoints (resumable)")
    parser.add_argument("--out", default=None,
                        help=f"where to save the final network (default {ASSET}; smoke: nowhere)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny network (CI)")
    parser.add_argument("--summary", default=None, help="also write the training summary JSON here")
    args = parser.parse_args(argv)
    defaults = dict(steps=(30, 1500), batch=(32, 128), warmup=(5, 200), log_every=(5, 50))
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.out is None and not args.smoke:
        args.out = str(ASSET)
    summary = train(args)
    brief = {k: v for k, v in summary.items() if k != "loss_history"}
    print(json.dumps(brief))
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
