r"""The reproduction: every study, at one scale, resumable, with its evidence.

Runs, part by part (--parts, in this order: fashion_mnist, mnist,
half_moons), each image data set's pipeline (HMC, VI and SGD on one subset
and MLP; the attack table with APGD, Square and the per-example worst case;
a robustness report with its gradient-masking checks and verdict per
posterior; the gradient against the number of posterior samples with both
measures; the robustness-accuracy sweep; the paper ablation) and the
half-moons gradient study over widths and training-set sizes.

Presets:
  --preset=quick  every study at toy size, a minute or two (a smoke run);
  --preset=cpu    the largest scale we measured to finish in about an hour
                  and a half on 2 CPU cores at HMC settings that converge
                  (Fashion-MNIST: 1000 training points, 784-16-10, 4 chains
                  x (1000 + 500), 48 minutes; half-moons: widths 16-512 on
                  500 and 2000 points); its outputs are docs/results/;
  --preset=paper  the paper's sizes (all data, 784-512-512-10, the full
                  sweep): for a GPU or TPU (--strategy).

MNIST has no offline source: pass --parts=mnist,... with --data_dir (the
four IDX files) or a TFDS copy.  With mnist among the parts, --data_dir is
MNIST's and Fashion-MNIST comes from Debian's dataset-fashion-mnist.

``findings.md`` holds the headline tables (rows of unconverged HMC
posteriors left out, named beneath); ``summary.md`` the parts, their
minutes and unconverged posteriors; every study's own files, with every
row and each posterior's diagnostics, are in its part's directory.

Stop it at any time: the same command resumes (finished parts are kept,
even when only their small files are left; HMC resumes from its
checkpoints, the sweep from its finished runs).  Other settings in the same
--output_dir are refused, naming what differs, unless --overwrite.

The work is :func:`tfp_bnn_adv.studies.reproduction.run_reproduction`'s.

Example (hours on 2 cores; run it in the background):
  nohup python -m launch.reproduce --preset=cpu \
      --output_dir=docs/results > reproduce.log 2>&1 &
"""

from absl import app
from absl import flags

from launch import flags as lf
from tfp_bnn_adv.studies import reproduction as reproduction_lib

FLAGS = lf.FLAGS

SHARED = lf.use("preset")
flags.DEFINE_list("parts", list(reproduction_lib.DEFAULT_PARTS),
                  "What to run, a subset of "
                  f"{', '.join(reproduction_lib.PARTS)} (always run in that "
                  "order).")
lf.adopt(__name__, SHARED)


def config_from_flags() -> reproduction_lib.ReproductionConfig:
    parts = lf.check_choices(FLAGS.parts, "parts", reproduction_lib.PARTS)
    if FLAGS.num_test is not None:
        raise lf.FlagError("reproduce: --num_test is set by the preset; the "
                           "studies' own scripts take it.")
    return reproduction_lib.preset_config(
        FLAGS.preset, parts=parts, data_dir=FLAGS.data_dir,
        data_source=FLAGS.data_source, seed=FLAGS.seed,
        max_rhat=FLAGS.max_rhat)


def main(argv):
    del argv
    out_dir, config, _ = lf.start(
        "reproduce", config_from_flags, reproduction_lib.fingerprint,
        directories=tuple(reproduction_lib.PARTS),
        flag_list=lf.script_flags(__name__, SHARED))
    with lf.strategy().scope():
        results = reproduction_lib.run_reproduction(
            config, out_dir, overwrite=FLAGS.overwrite)
    print(results["findings"])
    if results["unconverged"]:
        print("Unconverged HMC posteriors (left out of findings.md): "
              + "; ".join(results["unconverged"]))
    print(f"All results in {out_dir}/ (findings.md, summary.md, "
          "<part>/...).")


if __name__ == "__main__":
    app.run(main)
