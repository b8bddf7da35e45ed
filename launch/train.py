r"""Train a posterior (HMC, VI, SGD or deep ensemble) and save it.

Writes ``posterior.npz`` (a PosteriorEnsemble: weights as arrays, the
architecture as Keras config, no pickle), ``results.json`` (test accuracy,
diagnostics), ``flags.txt`` and, for HMC, resumable checkpoints in ``ckpt/``:
run the same command again after an interruption and it continues.

Example:
  python -m launch.train --output_dir=runs/fmnist_hmc --method=hmc \
      --dataset=fashion_mnist --hidden=256 --num_burnin_steps=500 \
      --num_results=250 --num_chains=2
"""

import os

from absl import app

from launch import flags as lf
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.training import fit_posterior

FLAGS = lf.FLAGS


def main(argv):
    del argv
    out_dir = lf.start("train")
    with lf.strategy().scope():
        ds = lf.dataset()
        settings = lf.inference_settings()
        ens, info = fit_posterior(lf.model(ds), ds.train_x, ds.train_y, settings,
                                  checkpoint_dir=os.path.join(out_dir, "ckpt"),
                                  verbose=1)
        ens.metadata.update({"dataset": FLAGS.dataset})
        path = os.path.join(out_dir, "posterior.npz")
        ens.save(path)
        n_test = FLAGS.num_test or len(ds.test_x)
        accuracy = ens.accuracy(ds.test_x[:n_test], ds.test_y[:n_test])
    out = common.StudyOutput(out_dir, "train")
    out.update({"test/accuracy": accuracy, "train/num_samples": ens.num_samples,
                "train/num_points": len(ds.train_x),
                "train/fit_seconds": info["wall_seconds"],
                "train/diagnostics": info.get("diagnostics"),
                "settings": info["settings"], "posterior": path})
    print(f"{settings.method} posterior with {ens.num_samples} samples: test "
          f"accuracy {accuracy:.4f}; saved to {path}")


if __name__ == "__main__":
    app.run(main)
