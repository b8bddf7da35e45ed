"""Benchmark: our full-batch HMC against NumPyro on the same BNN.

Two comparisons, each run side by side in one process on the same network
(Leaky-ReLU MLP, slope 0.2), the same data and the same prior
``N(0, prior_scale^2)`` on every weight and bias.

Leapfrog throughput (``*_leapfrogs_per_s``, ``*_speedup_vs_numpyro``): the
same initial weights, a fixed step size and leapfrog count (no adaptation)
and the same number of iterations.  Reported: steady-state leapfrog steps
per second (compilation excluded, and reported separately) and the ratio
ours / NumPyro; for the Fashion-MNIST case also the fraction of this
machine's measured fp32 matmul peak.  Steady state: ours runs in segments
(one compiled call each, see ``tfp_bnn_adv.inference.hmc``) and every
segment after the first is timed; NumPyro re-runs its compiled chain from
``post_warmup_state`` for the same number of iterations.  The best repeat of
each counts, as the machine may be shared.

Effective samples per second in function space (``halfmoons_ess_*``): the
half-moons 2-16-2 MLP on the 800 training points of ``half_moons(n=1000)``,
4 chains, the same warm-up and number of draws, each sampler with its own
defaults: ours ``hmc.sample`` (kernel ``"hmc"`` with the default trajectory
length, and ``"nuts"``), NumPyro's ``NUTS`` (diagonal mass-matrix adaptation,
``chain_method="vectorized"``, so both use the same cores).  For both, the
monitored quantity is the predictive probability of the class the pooled
ensemble predicts at each of the 200 test points, and its rank-normalised
bulk ESS and R-hat come from the same code
(``hmc.diagnostics.function_space``).  Wall time includes compilation:
ours is ``Diagnostics.wall_seconds`` (every compiled segment) and NumPyro's
is its first ``MCMC.run``, each plus the shared post-processing; NumPyro's
compile time is that run minus a second, identical one with another seed.
Ratios ours / NumPyro of ESS per second (minimum and median over the probe
points) are reported with, next to them, each side's R-hat.

Usage: ``python -m bench.hmc [--json] [--skip_fmnist] [--skip_throughput]
[--skip_ess] [--skip_ours_nuts] [--ess_num_warmup 500]
[--ess_num_results 200]``.  Needs the "bench" extra (``jax[cpu]``,
``numpyro``).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpyro  # pylint: disable=wrong-import-position
from numpyro import distributions as dist  # pylint: disable=wrong-import-position
from numpyro.infer import HMC, MCMC, NUTS  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from bench import common  # pylint: disable=wrong-import-position
from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import hmc  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference.hmc import diagnostics as hmc_diagnostics  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position

flags.adopt_module_key_flags(common)  # --json in every --help

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
def numpyro_mlp(widths, prior_scale):
    """The Leaky-ReLU MLP ``widths`` as a NumPyro model and a JAX forward pass.

    Args:
      widths: layer widths ``[in, hidden..., num_classes]``.
      prior_scale: prior standard deviation of every weight and bias.

    Returns:
      ``(model, forward, sites)``: ``model(x, y)`` samples ``w{l}``
      ``[in_l, out_l]`` and ``b{l}`` ``[out_l]`` from ``N(0, prior_scale^2)``
      and observes ``y`` ``[N]`` under ``Categorical(logits)``;
      ``forward(params, x)`` maps the parameters in ``Network`` order
      (``w0, b0, w1, b1, ...``) and ``x`` ``[B, in]`` to logits
      ``[B, num_classes]``; ``sites`` are the site names in that order.
    """

    num_layers = len(widths) - 1
    sites = [f"{kind}{l}" for l in range(num_layers) for kind in ("w", "b")]

    def forward(params, x):
        h = x
        for l in range(num_layers):
            h = h @ params[2 * l] + params[2 * l + 1]
            if l < num_layers - 1:
                h = jax.nn.leaky_relu(h, 0.2)
        return h

    def model(x, y):
        params = []
        for l in range(num_layers):
            params.append(numpyro.sample(f"w{l}", dist.Normal(
                0.0, prior_scale).expand([widths[l], widths[l + 1]]).to_event(2)))
            params.append(numpyro.sample(f"b{l}", dist.Normal(
                0.0, prior_scale).expand([widths[l + 1]]).to_event(1)))
        numpyro.sample("y", dist.Categorical(logits=forward(params, x)), obs=y)

    return model, forward, sites


def check_same_network(net, forward, x) -> float:
    """Max |logit difference| of ``forward`` and ``net`` at random weights.

    Raises:
      RuntimeError: when the two are not the same function, so a comparison
        would compare different models.
    """
    rng = np.random.default_rng(0)
    params = [rng.normal(size=s).astype(np.float32) for s in net.param_shapes]
    ours = net.apply_stack([tf.constant(p[None]) for p in params],
                           tf.constant(x))[0].numpy()
    theirs = np.asarray(forward(params, x))
    err = float(np.max(np.abs(ours - theirs)))
    if not err <= 1e-4 * max(1.0, float(np.max(np.abs(ours)))):
        raise RuntimeError(f"The NumPyro model is not our network: logits "
                           f"differ by up to {err:.3g}.")
    return err


def run_numpyro(x, y, init, widths, *, step_size, num_leapfrog_steps,
                iterations, segments, prior_scale):
    """Steady-state leapfrog steps/s of numpyro.infer.HMC on the same MLP."""

    model, _, sites = numpyro_mlp(widths, prior_scale)
    init_params = {name: jnp.asarray(p[0]) for name, p in zip(sites, init)}
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


# --------------------------------------------------------------------------
# Effective samples per second in function space.
# --------------------------------------------------------------------------
def function_space_ess(net, params_rc, probe_x, probe_y) -> dict:
    """Function-space R-hat/ESS of draws, computed as ``hmc.sample`` does.

    Args:
      net: the :class:`~tfp_bnn_adv.network.Network`.
      params_rc: float32 draws ``[R, C, *shape]`` per parameter.
      probe_x: float32 probe inputs ``[P, *input_shape]``.
      probe_y: int labels ``[P]``.

    Returns:
      ``function_rhat_median``, ``function_ess_min``, ``function_ess_median``
      (bulk ESS of all ``R * C`` draws, rank-normalised) and the pooled
      ensemble's ``probe_accuracy``.
    """
    probs = hmc_diagnostics.probe_probabilities(net, params_rc, probe_x)
    fs = hmc_diagnostics.function_space(probs, probe_y)
    pooled = np.argmax(probs.mean(axis=(0, 1)), axis=-1)
    return {"function_rhat_median": fs["function_rhat_median"],
            "function_ess_min": fs["function_ess_min"],
            "function_ess_median": fs["function_ess_median"],
            "probe_accuracy": float(np.mean(pooled == probe_y))}


def run_ess_ours(net, x, y, probe_x, probe_y, *, kernel, num_chains,
                 num_warmup, num_results, prior_scale, seed, jit_compile):
    """``hmc.sample`` with its defaults; wall time and function-space ESS."""
    start = time.perf_counter()
    ensemble, diag = hmc.sample(
        net, x, y, probe_x=probe_x, probe_y=probe_y, kernel=kernel,
        num_chains=num_chains, num_burnin_steps=num_warmup,
        num_results=num_results, prior_scale=prior_scale, seed=seed,
        jit_compile=jit_compile)
    call_seconds = time.perf_counter() - start
    start = time.perf_counter()
    c = ensemble.metadata["num_chains"]
    # Chain-major [C * R, ...] -> [R, C, ...].
    params = [np.asarray(p) for p in ensemble.params]
    params_rc = [np.swapaxes(np.reshape(p, (c, -1) + p.shape[1:]), 0, 1)
                 for p in params]
    fs = function_space_ess(net, params_rc, probe_x, probe_y)
    post_seconds = time.perf_counter() - start
    if not np.isclose(fs["function_ess_min"], diag.function_ess_min):
        raise RuntimeError(
            f"ESS recomputed from the ensemble ({fs['function_ess_min']:.4g}) "
            f"differs from hmc.sample's ({diag.function_ess_min:.4g}): the "
            "draws were reordered wrongly.")
    return dict(
        fs, seconds=diag.wall_seconds + post_seconds,
        end_to_end_seconds=call_seconds + post_seconds,
        compile_seconds=diag.compile_seconds,
        leapfrogs_per_iteration=diag.mean_leapfrog_steps,
        leapfrogs_per_second=diag.leapfrog_steps_per_second,
        num_leapfrog_steps=diag.num_leapfrog_steps,
        step_size=float(np.mean(diag.step_size)),
        acceptance=float(np.mean(diag.acceptance_rate)),
        num_divergent=diag.num_divergent, jit=diag.jit)


def run_ess_numpyro(net, x, y, probe_x, probe_y, widths, *, num_chains,
                    num_warmup, num_results, prior_scale, seed):
    """NumPyro's NUTS with its defaults; wall time and function-space ESS.

    The first run (its compilation included) gives the draws and the wall
    time; an identical second run with another seed, compiled already,
    gives the compile time by difference.
    """

    model, forward, sites = numpyro_mlp(widths, prior_scale)
    logit_error = check_same_network(net, forward, probe_x)
    mcmc = MCMC(NUTS(model), num_warmup=num_warmup, num_samples=num_results,
                num_chains=num_chains, chain_method="vectorized",
                progress_bar=False)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    extra_fields = ("num_steps", "accept_prob", "diverging")
    seconds = []
    for key in (seed, seed + 1):
        start = time.perf_counter()
        mcmc.run(jax.random.PRNGKey(key), xj, yj, extra_fields=extra_fields)
        jax.block_until_ready(mcmc.get_samples())
        seconds.append(time.perf_counter() - start)
        if len(seconds) == 1:
            samples = mcmc.get_samples(group_by_chain=True)
            extra = mcmc.get_extra_fields(group_by_chain=True)
            step_size = np.asarray(mcmc.last_state.adapt_state.step_size)
    start = time.perf_counter()
    # [C, R, ...] -> [R, C, ...] in Network order.
    params_rc = [np.swapaxes(np.asarray(samples[name]), 0, 1) for name in sites]
    fs = function_space_ess(net, params_rc, probe_x, probe_y)
    post_seconds = time.perf_counter() - start
    steps = np.asarray(extra["num_steps"], np.float64)  # [C, R]
    return dict(
        fs, seconds=seconds[0] + post_seconds,
        end_to_end_seconds=seconds[0] + post_seconds,
        compile_seconds=max(0.0, seconds[0] - seconds[1]),
        second_run_seconds=seconds[1],
        leapfrogs_per_iteration=float(steps.mean()),
        # Vectorised chains advance in lock-step: each iteration costs the
        # longest chain's trajectory.
        lockstep_leapfrogs_per_iteration=float(steps.max(axis=0).mean()),
        step_size=float(np.mean(step_size)),
        acceptance=float(np.mean(np.asarray(extra["accept_prob"]))),
        num_divergent=int(np.sum(np.asarray(extra["diverging"]))),
        max_logit_error_vs_ours=logit_error)


def _per_second(side: dict) -> dict:
    excl = side["seconds"] - (side["compile_seconds"]
                              if np.isfinite(side["compile_seconds"]) else 0.0)
    return dict(side,
                ess_min_per_s=side["function_ess_min"] / side["seconds"],
                ess_median_per_s=side["function_ess_median"] / side["seconds"],
                ess_min_per_s_excl_compile=side["function_ess_min"] / excl,
                ess_min_per_s_end_to_end=(side["function_ess_min"] /
                                          side["end_to_end_seconds"]))


def run_ess_case(name, dataset, hidden, *, num_chains, num_warmup,
                 num_results, ours_kernels, prior_scale=1.0, seed=0,
                 jit_compile=None):
    """Function-space ESS per second: ours (per kernel) against NumPyro NUTS."""
    x = np.asarray(dataset.train_x, np.float32)
    y = np.asarray(dataset.train_y, np.int32)
    probe_x = np.asarray(dataset.test_x, np.float32)
    probe_y = np.asarray(dataset.test_y, np.int32)
    num_classes = int(y.max()) + 1
    widths = [x.shape[1]] + list(hidden) + [num_classes]
    net = Network.from_keras(models.mlp((x.shape[1],), num_classes, hidden))
    settings = dict(num_chains=num_chains, num_warmup=num_warmup,
                    num_results=num_results, prior_scale=prior_scale,
                    seed=seed)
    sides = {}
    for kernel in ours_kernels:
        common.log(f"{name} ESS: ours, kernel={kernel} ({num_chains} chains, "
                   f"{num_warmup} warm-up + {num_results} draws)")
        sides[f"ours_{kernel}"] = _per_second(run_ess_ours(
            net, x, y, probe_x, probe_y, kernel=kernel,
            jit_compile=jit_compile, **settings))
        common.log(f"{name} ESS: ours_{kernel} {sides[f'ours_{kernel}']}")
    common.log(f"{name} ESS: NumPyro NUTS")
    sides["numpyro_nuts"] = _per_second(run_ess_numpyro(
        net, x, y, probe_x, probe_y, widths, **settings))
    common.log(f"{name} ESS: numpyro_nuts {sides['numpyro_nuts']}")

    columns = ["seconds", "compile_seconds", "leapfrogs_per_iteration",
               "function_ess_min", "function_ess_median",
               "function_rhat_median", "ess_min_per_s", "ess_median_per_s",
               "probe_accuracy"]
    common.table([[side] + [values[c] for c in columns]
                  for side, values in sides.items()], ["sampler"] + columns)
    theirs = sides["numpyro_nuts"]
    results = {f"{name}_ess_num_train": len(x),
               f"{name}_ess_num_probe_points": len(probe_x),
               f"{name}_ess_num_chains": num_chains,
               f"{name}_ess_num_warmup": num_warmup,
               f"{name}_ess_num_results": num_results}
    for side, values in sides.items():
        for k, v in values.items():
            results[f"{name}_ess_{side}_{k}"] = v
    for kernel in ours_kernels:
        ours = sides[f"ours_{kernel}"]
        # The headline keys are ours with the default kernel ("hmc").
        label = "" if kernel == "hmc" else f"ours_{kernel}_"
        for key, field in (("ess_per_s", "ess_min_per_s"),
                           ("median_ess_per_s", "ess_median_per_s"),
                           ("ess_per_s_excl_compile",
                            "ess_min_per_s_excl_compile"),
                           ("ess_per_s_end_to_end",
                            "ess_min_per_s_end_to_end")):
            results[f"{name}_{label}{key}_vs_numpyro_nuts"] = (
                ours[field] / theirs[field])
    return results


FLAGS = flags.FLAGS
flags.DEFINE_bool("skip_fmnist", False, "leapfrog throughput on half-moons "
                  "only")
flags.DEFINE_bool("skip_throughput", False, "no leapfrog-throughput cases")
flags.DEFINE_bool("skip_ess", False, "no function-space ESS-per-second "
                  "comparison")
flags.DEFINE_bool("skip_ours_nuts", False, "ESS comparison: ours with "
                  "kernel='hmc' only")
flags.DEFINE_enum("jit", "auto", ["auto", "xla", "default"],
                  "our compiler choice (auto: timed per run)")
flags.DEFINE_integer("fmnist_iterations", 3, "HMC iterations of the "
                     "Fashion-MNIST throughput case")
flags.DEFINE_integer("halfmoons_iterations", 2000, "HMC iterations of the "
                     "half-moons throughput case")
flags.DEFINE_integer("ess_num_chains", 4, "chains of the ESS comparison, "
                     "both samplers")
flags.DEFINE_integer("ess_num_warmup", 500, "warm-up iterations per chain, "
                     "both samplers")
flags.DEFINE_integer("ess_num_results", 200, "kept draws per chain, both "
                     "samplers")


def main(argv):
    del argv
    args = FLAGS
    jit = {"auto": "auto", "xla": True, "default": False}[args.jit]
    results = dict(common.machine_info())
    results.update(jax=jax.__version__, numpyro=numpyro.__version__,
                   load_average_1min=os.getloadavg()[0],
                   flop_formula=FLOP_FORMULA)
    if not args.skip_throughput:
        moons = data.half_moons(n=625, seed=0)  # 500 training points
        results.update(run_case(
            "halfmoons", moons.train_x, moons.train_y, (128,), step_size=1e-3,
            num_leapfrog_steps=10, iterations=args.halfmoons_iterations,
            segments=5, jit_compile=jit))
    if not args.skip_throughput and not args.skip_fmnist:
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
    if not args.skip_ess:
        results.update(run_ess_case(
            "halfmoons", data.half_moons(n=1000, seed=0), (16,),
            num_chains=args.ess_num_chains, num_warmup=args.ess_num_warmup,
            num_results=args.ess_num_results,
            ours_kernels=("hmc",) if args.skip_ours_nuts else ("hmc", "nuts"),
            jit_compile=jit))
    results["load_average_1min_end"] = os.getloadavg()[0]
    common.report(results, args.json)


if __name__ == "__main__":
    app.run(main)
