"""Benchmark: our full-batch HMC against NumPyro's HMC on the same BNN.

Both samplers run the same network (Leaky-ReLU MLP), the same data, the same
prior ``N(0, prior_scale^2)``, the same initial weights, a fixed step size and
leapfrog count (no adaptation) and the same number of iterations, in one
process.  Reported: steady-state leapfrog steps per second (compilation
excluded, and reported separately) and the ratio ours / NumPyro; for the
Fashion-MNIST case also the fraction of this machine's measured fp32 matmul
peak.

Steady state: ours runs in segments (one compiled call each, see
``tfp_bnn_adv.inference.hmc``) and every segment after the first is timed;
NumPyro re-runs its compiled chain from ``post_warmup_state`` for the same
number of iterations.  The best repeat of each counts, as the machine may be
shared.

Usage: ``python -m bench.hmc [--json] [--skip_fmnist]``.  Needs the "bench"
extra (``jax[cpu]``, ``numpyro``).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from bench import common  # pylint: disable=wrong-import-position
from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import hmc  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position

FLOP_FORMULA = ("FLOPs per leapfrog step = 2*N*sum_l(in_l*out_l) [forward] + "
                "2*N*sum_l(in_l*out_l) [weight gradients] + "
                "2*N*sum_{l>=2}(in_l*out_l) [activation gradients; none for "
                "the input layer]; elementwise ops not counted")


def leapfrog_flops(n: int, widths) -> float:
    """Matmul FLOPs of one full-batch gradient of an MLP (see FLOP_FORMULA)."""
    mults = [a * b for a, b in zip(widths[:-1], widths[1:])]
    return 2.0 * n * (2 * sum(mults) + sum(mults[1:]))


# --------------------------------------------------------------------------
# Ours.
# --------------------------------------------------------------------------
def run_ours(net, x, y, init, *, step_size, num_leapfrog_steps, iterations,
             segments, prior_scale, jit_compile):
    """Steady-state leapfrog steps/s of hmc.sample, best segment after the first."""
    rates = []
    start = time.perf_counter()
    _, diag = hmc.sample(
        net, x, y, num_chains=1, num_burnin_steps=0, num_adaptation_steps=0,
        num_results=iterations, step_size=step_size,
        num_leapfrog_steps=num_leapfrog_steps, prior_scale=prior_scale,
        init=init, seed=0, jit_compile=jit_compile,
        checkpoint_every=iterations // segments,
        segment_callback=lambda info: rates.append(info["leapfrogs_per_second"]))
    total = time.perf_counter() - start
    return {"leapfrogs_per_second": max(rates[1:]),
            "compile_seconds": diag.compile_seconds, "jit": diag.jit,
            "acceptance": diag.acceptance_rate[0], "total_seconds": total}


# --------------------------------------------------------------------------
# NumPyro.
# --------------------------------------------------------------------------
def run_numpyro(x, y, init, widths, *, step_size, num_leapfrog_steps,
                iterations, segments, prior_scale):
    """Steady-state leapfrog steps/s of numpyro.infer.HMC on the same MLP."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpyro  # pylint: disable=g-import-not-at-top
    from numpyro import distributions as dist  # pylint: disable=g-import-not-at-top
    from numpyro.infer import HMC, MCMC  # pylint: disable=g-import-not-at-top

    num_layers = len(widths) - 1

    def model(x, y):
        h = x
        for l in range(num_layers):
            w = numpyro.sample(f"w{l}", dist.Normal(0.0, prior_scale).expand(
                [widths[l], widths[l + 1]]).to_event(2))
            b = numpyro.sample(f"b{l}", dist.Normal(0.0, prior_scale).expand(
                [widths[l + 1]]).to_event(1))
            h = h @ w + b
            if l < num_layers - 1:
                h = jax.nn.leaky_relu(h, 0.2)
        numpyro.sample("y", dist.Categorical(logits=h), obs=y)

    init_params = {}
    for l in range(num_layers):
        init_params[f"w{l}"] = jnp.asarray(init[2 * l][0])
        init_params[f"b{l}"] = jnp.asarray(init[2 * l + 1][0])
    kernel = HMC(model, step_size=step_size, num_steps=num_leapfrog_steps,
                 adapt_step_size=False, adapt_mass_matrix=False,
                 dense_mass=False)
    per_run = iterations // segments
    mcmc = MCMC(kernel, num_warmup=0, num_samples=per_run, progress_bar=False)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(0), xj, yj, init_params=init_params)
    jax.block_until_ready(mcmc.get_samples())
    first = time.perf_counter() - start
    rates, seconds = [], []
    for _ in range(segments - 1):
        mcmc.post_warmup_state = mcmc.last_state
        start = time.perf_counter()
        mcmc.run(mcmc.post_warmup_state.rng_key, xj, yj)
        jax.block_until_ready(mcmc.get_samples())
        seconds.append(time.perf_counter() - start)
        rates.append(per_run * num_leapfrog_steps / seconds[-1])
    return {"leapfrogs_per_second": max(rates),
            "compile_seconds": max(0.0, first - min(seconds)),
            "total_seconds": first + sum(seconds)}


# --------------------------------------------------------------------------
# Cases.
# --------------------------------------------------------------------------
def run_case(name, x, y, hidden, *, step_size, num_leapfrog_steps,
             iterations, segments, prior_scale=1.0, jit_compile=None):
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    y = np.asarray(y, np.int32)
    num_classes = int(y.max()) + 1
    widths = [x.shape[1]] + list(hidden) + [num_classes]
    net = Network.from_keras(models.mlp((x.shape[1],), num_classes, hidden))
    # Keras initial weights: a realistic region, the same for both samplers.
    init = net.init_params(tf.constant([0, 1]), num_samples=1)
    settings = dict(step_size=step_size, num_leapfrog_steps=num_leapfrog_steps,
                    iterations=iterations, segments=segments,
                    prior_scale=prior_scale)
    common.log(f"{name}: ours ({iterations} iterations x "
               f"{num_leapfrog_steps} leapfrog steps, {segments} segments)")
    ours = run_ours(net, x, y, init, jit_compile=jit_compile, **settings)
    common.log(f"{name}: ours {ours}")
    common.log(f"{name}: NumPyro")
    theirs = run_numpyro(x, y, [p.numpy() for p in init], widths, **settings)
    common.log(f"{name}: NumPyro {theirs}")
    flops = leapfrog_flops(len(x), widths)
    return {
        f"{name}_ours_leapfrogs_per_s": ours["leapfrogs_per_second"],
        f"{name}_numpyro_leapfrogs_per_s": theirs["leapfrogs_per_second"],
        f"{name}_speedup_vs_numpyro": (ours["leapfrogs_per_second"] /
                                       theirs["leapfrogs_per_second"]),
        f"{name}_ours_compile_s": ours["compile_seconds"],
        f"{name}_numpyro_compile_s": theirs["compile_seconds"],
        f"{name}_ours_jit": ours["jit"],
        f"{name}_gflop_per_leapfrog": flops / 1e9,
        f"{name}_ours_gflops": flops * ours["leapfrogs_per_second"] / 1e9,
        f"{name}_numpyro_gflops": flops * theirs["leapfrogs_per_second"] / 1e9,
    }


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--skip_fmnist", action="store_true",
                   help="only the half-moons case")
    p.add_argument("--jit", default="auto", choices=["auto", "xla", "default"],
                   help="our compiler choice (auto: timed per run)")
    p.add_argument("--fmnist_iterations", type=int, default=3)
    p.add_argument("--halfmoons_iterations", type=int, default=2000)
    args = p.parse_args(argv)
    jit = {"auto": "auto", "xla": True, "default": False}[args.jit]
    import jax  # pylint: disable=g-import-not-at-top
    import numpyro  # pylint: disable=g-import-not-at-top
    results = dict(common.machine_info())
    results.update(jax=jax.__version__, numpyro=numpyro.__version__,
                   load_average_1min=os.getloadavg()[0],
                   flop_formula=FLOP_FORMULA)
    moons = data.half_moons(n=625, seed=0)  # 500 training points
    results.update(run_case(
        "halfmoons", moons.train_x, moons.train_y, (128,), step_size=1e-3,
        num_leapfrog_steps=10, iterations=args.halfmoons_iterations,
        segments=5, jit_compile=jit))
    if not args.skip_fmnist:
        fm = data.fashion_mnist()
        # The peak is measured before and after the case and the larger
        # figure kept, so a burst of load from other jobs does not inflate
        # the fraction.
        peak_before = common.matmul_peak_gflops()["gflops"]
        results.update(run_case(
            "fmnist", fm.train_x, fm.train_y, (256,), step_size=1e-4,
            num_leapfrog_steps=100, iterations=args.fmnist_iterations,
            segments=args.fmnist_iterations, jit_compile=jit))
        peak = max(peak_before, common.matmul_peak_gflops()["gflops"])
        results["matmul_peak_gflops"] = peak
        results["fmnist_fraction_of_matmul_peak"] = (
            results["fmnist_ours_gflops"] / peak)
    results["load_average_1min_end"] = os.getloadavg()[0]
    common.report(results, args.json)


if __name__ == "__main__":
    main()
