"""What the language-model tools share: the corpus (``corpus``) and the training loop with its hooks (``train``).

The model is ``nmcompile.examples.GPT``. The tools (reproduce_lm.py, long_run.py, bench_train.py, bench_step_cpu.py)
run as scripts from ``tools/``, where Python puts their directory first on ``sys.path``, so ``import lm`` finds
this package without any tool editing the path.
"""
