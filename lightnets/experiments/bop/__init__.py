"""Experiments of the [Re] Bop paper (Vaessen et al., "[Re] Latent Weights Do Not Exist"):
`lightnets repro bop-approx`, `bop-lr`, `bop-hparams` and `bop-cifar`.

- bop-approx (Sec. 3.1.1, Table 1): train `bnn_mnist` with latent weights and Adam, then
  evaluate it with binary weights, with its real latent weights (the kernel quantizer switched
  off, activations still the sign), and with real weights after retraining only the
  BatchNorm layers (binary layers frozen, real latent weights in use). Writes results.* and
  table1.md (mean and variance over seeds, as the paper's Table 1, beside the paper's).
- bop-lr (Sec. 3.1.2, Fig. 1): the five initialization / optimizer / learning-rate
  configurations of latent-weight training; accuracy curves (fig1.png).
- bop-hparams (Sec. 3.2, Fig. 2): Bop with gamma in {1e-2, 1e-3, 1e-4} at tau = 1e-6 and tau in
  {0, 1e-5, 1e-6} at gamma = 1e-3 (the shared point is trained once); the log flip ratio of
  eq. 7 per step and the accuracy per epoch, smoothed (fig2.png). On CIFAR-10 the procedure is
  Sec. 3.3's ("identical ... except for the number of epochs"): each run's gamma decays x0.1
  every 100 epochs and a run stops after 10 epochs without a flip; `--constant-gamma` (ours)
  keeps each gamma constant and never stops early, so whole runs at one gamma are compared.
- bop-cifar (Sec. 3.3): BinaryNet on CIFAR-10 with the paper's recipe (`binarynet_cifar`; the
  last 10% of the training images held out for validation, as the paper), reporting the test
  accuracy of the checkpoint with the lowest validation loss beside the [Re] paper's 88.67%
  and the original paper's 91.3%.

Data: the MNIST experiments run on the bundled 5000-image subset (4000 train / 1000 test) by
default, so a CPU runs each in minutes; `--data mnist --root PATH` reads the full set.
bop-hparams also takes `--data cifar10 --root PATH` (BinaryNet, as the paper's Fig. 2).
Every experiment is resumable: re-running the same command continues where it stopped.

One module per experiment (approx, lr, hparams, cifar), with what they share: the paper's
numbers and settings (paper), the common options (setting), curves (curves) and test
accuracy outside training (evaluation). Importing this package registers all four.
"""

from __future__ import annotations

from lightnets.experiments.bop.approx import (
    approx_plan,
    approx_spec,
    approx_table1,
    freeze_binary_layers_,
    run_approx,
    use_real_weights_,
)
from lightnets.experiments.bop.cifar import cifar_spec, cifar_test_table
from lightnets.experiments.bop.curves import gaussian_smooth, plot_curves_by_variant
from lightnets.experiments.bop.evaluation import best_checkpoint_test_accuracy, eval_accuracy
from lightnets.experiments.bop.hparams import hparams_spec, plot_hparams
from lightnets.experiments.bop.lr import lr_spec
from lightnets.experiments.bop.paper import (
    LR_CONFIGS,
    PAPER_CIFAR,
    PAPER_CIFAR_ORIGINAL,
    PAPER_CIFAR_RE,
    PAPER_GAMMAS,
    PAPER_MNIST,
    PAPER_TABLE1,
    PAPER_THRESHOLDS,
)

__all__ = [
    "LR_CONFIGS",
    "PAPER_CIFAR",
    "PAPER_CIFAR_ORIGINAL",
    "PAPER_CIFAR_RE",
    "PAPER_GAMMAS",
    "PAPER_MNIST",
    "PAPER_TABLE1",
    "PAPER_THRESHOLDS",
    "approx_plan",
    "approx_spec",
    "approx_table1",
    "best_checkpoint_test_accuracy",
    "cifar_spec",
    "cifar_test_table",
    "eval_accuracy",
    "freeze_binary_layers_",
    "gaussian_smooth",
    "hparams_spec",
    "lr_spec",
    "plot_curves_by_variant",
    "plot_hparams",
    "run_approx",
    "use_real_weights_",
]
