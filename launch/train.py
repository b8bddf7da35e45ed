r"""Train a posterior (HMC, VI, SGD or deep ensemble) and save it.

Writes ``posterior.npz`` (a PosteriorEnsemble: weights as arrays, the
architecture as Keras config, no pickle), ``results.json`` (test accuracy,
diagnostics: for HMC the function-space R-hat/ESS on the held-out test
points, ``train/convergence/...``; for VI the loss trace and its plateau),
``flags.txt``, for HMC a trace plot ``figures/traces_train.png`` and
resumable checkpoints in ``ckpt/``: run the same command again after an
interruption and it continues.  An unconverged HMC posterior is saved but
reported as UNCONVERGED (studies that use it refuse it unless
--allow_unconverged).

``results.json`` records the run's fingerprint (see :func:`fingerprint`); a
different configuration in the same --output_dir is refused before anything
is fitted, naming the settings that differ, unless --overwrite deletes the
earlier posterior, results and checkpoints.

Example:
  python -m launch.train --output_dir=runs/fmnist_hmc --method=hmc \
      --dataset=fashion_mnist --hidden=256 --num_burnin_steps=500 \
      --num_results=250 --num_chains=2
"""

import os

from absl import app

from launch import flags as lf
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.training import InferenceSettings
from tfp_bnn_adv.studies.training import fit_posterior

FLAGS = lf.FLAGS


def fingerprint(settings: InferenceSettings) -> dict:
    """The run's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: the data set (name, and directory and source or half-moons
    size), --num_train and --num_test (the test points give the accuracy and
    HMC's diagnostics), the model (the SHA-256 of --keras_model, else
    --architecture, --hidden and, for the CNN, --filters), the method's own
    inference settings with their seed (:func:`common.settings_fields`) and
    --max_rhat (the verdict in results.json).
    """
    if FLAGS.keras_model:
        model = {"keras_model": common.file_sha256(FLAGS.keras_model)}
    else:
        model = {"architecture": FLAGS.architecture,
                 "hidden": lf.ints(FLAGS.hidden, "hidden", 0)}
        if FLAGS.architecture == "cnn":
            model["filters"] = lf.ints(FLAGS.filters, "filters")
    fields = {"data": common.data_fields(FLAGS.dataset, FLAGS.data_dir,
                                         FLAGS.data_source, FLAGS.half_moons_n),
              "num_train": lf.count(FLAGS.num_train),
              "num_test": lf.count(FLAGS.num_test), "model": model,
              "settings": common.settings_fields(settings),
              "max_rhat": FLAGS.max_rhat}
    inputs = ({"keras_model": os.path.abspath(FLAGS.keras_model)}
              if FLAGS.keras_model else {})
    return common.fingerprint("train", fields, inputs)


def main(argv):
    del argv
    out_dir, settings, fp = lf.start("train", lf.inference_settings,
                                     fingerprint, directories=("ckpt",))
    ds = lf.dataset()
    out = common.StudyOutput(out_dir, "train", fingerprint=fp,
                             overwrite=FLAGS.overwrite,
                             owned=("posterior.npz", "ckpt"))
    with lf.strategy().scope():
        n_test = lf.count(FLAGS.num_test)
        test_x, test_y = ds.test_x[:n_test], ds.test_y[:n_test]
        ens, info = fit_posterior(lf.model(ds), ds.train_x, ds.train_y, settings,
                                  checkpoint_dir=os.path.join(out_dir, "ckpt"),
                                  verbose=1, probe_x=test_x, probe_y=test_y,
                                  max_rhat=FLAGS.max_rhat)
        ens.metadata.update({"dataset": FLAGS.dataset})
        path = os.path.join(out_dir, "posterior.npz")
        ens.save(path)
        accuracy = ens.accuracy(test_x, test_y)
    report = common.record_posterior(out, "train", ens, FLAGS.max_rhat)
    out.update({"test/accuracy": accuracy, "train/num_samples": ens.num_samples,
                "train/num_points": len(ds.train_x),
                "train/fit_seconds": info["wall_seconds"],
                "train/diagnostics": info.get("diagnostics"),
                "settings": info["settings"], "posterior": path})
    print(f"{common.mark(settings.method, report)} posterior with "
          f"{ens.num_samples} samples: test accuracy {accuracy:.4f}; saved to "
          f"{path}")
    if report["method"] in ("hmc", "vi"):
        print(common.describe("train", report))


if __name__ == "__main__":
    app.run(main)
