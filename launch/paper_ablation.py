r"""Why the paper found BNNs robust: its semantics, switch by switch.

Trains HMC (full data, and restarted per batch as the authors ran it) and VI
(KL once, and over-weighted by N/B) on one dataset, then scores Rand / FGSM /
PGD accuracy and softmax robustness under the original semantics, with each
switch off alone, each on alone from the corrected baseline, and fully
corrected (:mod:`tfp_bnn_adv.paper`).  Writes ``summary.md`` (a paragraph
naming the switches that account for the gap), ``table.md``/``.csv``,
``posteriors.md`` (diagnostics), ``results.json`` and
``figures/switch_effects.png``.  Rerun the same command to resume; the
posteriors are reused.

Example (minutes on 2 cores, Fashion-MNIST offline):
  python -m launch.paper_ablation --output_dir=runs/ablation
Paper scale (MNIST, 2x512, hours; a GPU helps):
  python -m launch.paper_ablation --output_dir=runs/ablation_mnist \
      --preset=paper --dataset=mnist --data_dir=/path/to/mnist_idx
"""

import dataclasses

from absl import app
from absl import flags

from launch import flags as lf
from tfp_bnn_adv.studies.paper_ablation import METHODS
from tfp_bnn_adv.studies.paper_ablation import PaperAblationConfig
from tfp_bnn_adv.studies.paper_ablation import fingerprint
from tfp_bnn_adv.studies.paper_ablation import run_paper_ablation

FLAGS = lf.FLAGS

SHARED = lf.use("preset", "dataset", "num_train", "hidden", "eps", "switches",
                "allow_unconverged", "pgd_steps", "epochs", "vi_samples",
                *lf.HMC_FLAGS)
flags.DEFINE_list("ablation_methods", list(METHODS), "Posteriors: "
                  f"{', '.join(METHODS)}.")
flags.DEFINE_enum("corrected_gradient", "predictive", ["predictive", "expected"],
                  "FGSM's and PGD's gradient when the attack loss is "
                  "corrected.")
flags.DEFINE_integer("hmc_batch_size", None, "Points per restarted HMC run in "
                     "the authors' training (default: the preset's; the "
                     "authors: 5000).", lower_bound=1)
flags.DEFINE_integer("max_samples", None, "Thin larger posteriors to this "
                     "many samples before attacking (default: the preset's).",
                     lower_bound=1)
lf.register("ablation_methods",
            lambda v: lf.check_choices(v, "ablation_methods", METHODS))
lf.adopt(__name__, SHARED)


def config_from_flags() -> PaperAblationConfig:
    make = (PaperAblationConfig.paper if FLAGS.preset == "paper"
            else PaperAblationConfig.quick)
    overrides = dict(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                     data_source=FLAGS.data_source, seed=FLAGS.seed,
                     switches=tuple(FLAGS.switches),
                     methods=tuple(FLAGS.ablation_methods),
                     corrected_gradient=FLAGS.corrected_gradient,
                     eps=FLAGS.eps, **lf.convergence())
    for flag in ("pgd_steps", "hmc_batch_size", "max_samples"):
        if FLAGS[flag].value is not None:
            overrides[flag] = FLAGS[flag].value
    if FLAGS.num_test is not None:
        overrides["num_test"] = lf.count(FLAGS.num_test)
    if FLAGS.num_train is not None:
        overrides["num_train"] = lf.count(FLAGS.num_train)
    if lf.explicit("hidden"):
        overrides["hidden"] = lf.ints(FLAGS.hidden, "hidden")
    config = make(**overrides)
    vi = {name: FLAGS[name].value for name in ("epochs", "vi_samples")
          if lf.explicit(name)}
    config = dataclasses.replace(
        config, hmc=config.hmc.replace(**lf.hmc_overrides()),
        vi=config.vi.replace(**vi))
    config.validate()
    return config


def main(argv):
    del argv
    out_dir, config, _ = lf.start("paper_ablation", config_from_flags,
                                  fingerprint, directories=("posteriors", "ckpt"),
                                  flag_list=lf.script_flags(__name__, SHARED))
    with lf.strategy().scope():
        results = run_paper_ablation(config, out_dir, overwrite=FLAGS.overwrite)
    print(results["summary_markdown"])
    print(f"Figures: {', '.join(results['figures'])}")


if __name__ == "__main__":
    app.run(main)
