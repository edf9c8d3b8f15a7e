"""``clipchain study``: which clipping, with which optimizer, where, at what threshold and cost.

Trains models side by side with every clipping strategy, optimizer, placement (before or after the
optimizer), learning rate and seed, and reports which combinations keep training stable. From the
command line:

    clipchain study --quick
    python -m clipchain study --task rnn-adding --optimizers sgd adam --placement both

From Python, on a model of your own: :func:`run` with a :class:`Task`. Needs the ``study`` extra
(``pip install 'clipchain[study]'``: flax, matplotlib, rich).
"""

from clipchain.study.record import RunRecord
from clipchain.study.strategies import DEFAULT_LRS, OPTIMIZERS, PLACEMENTS, STRATEGIES, Strategy
from clipchain.study.study import run, run_study
from clipchain.study.task import Task

__all__ = [
  "DEFAULT_LRS",
  "OPTIMIZERS",
  "PLACEMENTS",
  "RunRecord",
  "STRATEGIES",
  "Strategy",
  "Task",
  "run",
  "run_study",
]
