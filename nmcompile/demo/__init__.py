"""``nmcompile demo``: train one small model on bundled data under every gradient recipe and compare.

The same MLP, the same seeds and the same batches are trained with: dense, MVUE 2:4 and 1:2 on the
update (wgrad) GEMMs, greedy 2:4 (the biased baseline), MVUE and greedy 2:4 on both backward GEMMs
(wgrad+dgrad: where greedy's bias compounds through the layers), LUQ 4-bit gradients with SMP 2 and
SAWB 4-bit forward, and MVUE 2:4 followed by LUQ 4-bit; each for several seeds. After the first seed's
run, the gradient-noise monitor measures each recipe's gradient error on one batch: its variance and its
bias. Data: scikit-learn's bundled 8x8 digits (no download). Output: a rich progress bar per run
(stderr), a rich table (stdout, mean ± std over seeds), ``curves.png`` and ``results.json`` in ``--out``.

``--quick`` trains a narrower MLP (hidden 64) for 2 epochs, one seed, and compiles with
``inner="aot_eager"`` (the same rewritten graphs run eagerly, no C++ code generation); the default
trains hidden 128 for 10 epochs, seeds 0 1 2, through Inductor.

The package: ``recipes`` (the recipes table ``METHODS`` and the presets), ``model`` (the MLP and its test
accuracy), ``training`` (the loop, the FLOP shares, the gradient noise), ``environment`` (versions and
machine), ``plots`` (curves.png) and ``cli`` (the command's arguments, the run, the table, results.json).
"""
from __future__ import annotations

from nmcompile.demo.cli import add_arguments, main, results_table, run_demo
from nmcompile.demo.environment import cpu_name, environment
from nmcompile.demo.model import DigitsMLP, evaluate
from nmcompile.demo.plots import plot_curves
from nmcompile.demo.recipes import DEFAULT, METHODS, QUICK
from nmcompile.demo.training import cosine_lr, flop_shares, gradient_noise, steps_per_epoch, train

__all__ = ["DEFAULT", "METHODS", "QUICK", "DigitsMLP", "add_arguments", "cosine_lr", "cpu_name", "environment",
           "evaluate", "flop_shares", "gradient_noise", "main", "plot_curves", "results_table", "run_demo",
           "steps_per_epoch", "train"]
