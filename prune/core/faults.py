"""Fault injection for the reliability tests: ``PRUNE_FAULT=<stage>:<action>``.

``fault_point(stage)`` is called at every stage boundary of a run; when the environment
variable names that stage, the action happens there:

* ``kill``       the process dies at once (SIGKILL: no cleanup code runs), like a power cut;
* ``interrupt``  ``KeyboardInterrupt`` (Ctrl-C: cleanup code runs);
* ``term``       SIGTERM to this process (what ``timeout``, SLURM and ``docker stop`` send);
* ``term_launcher``  SIGTERM to the parent process (under ``torchrun``: the launcher, which stops every rank),
  then a wait there, so the rank is stopped at this point;
* ``enospc``     ``OSError(ENOSPC)``, the disk is full.

Under a launcher, ``PRUNE_FAULT_RANK=<rank>`` limits the fault to that rank.
Unset (always, outside tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

#: where ``fault_point`` is called, in run order (``scoring``: after each scored batch;
#: ``evaluating``: between perplexity and lm-eval, for the original and the pruned model)
STAGES = ("loaded", "scoring", "scored", "selected", "evaluating", "evaluated_original", "pruned", "evaluated_pruned",
          "saving", "saved_weights", "before_rename", "swapping", "swapped")


def fault_point(stage: str) -> None:
    spec = os.environ.get("PRUNE_FAULT")
    if not spec:
        return
    where, _, action = spec.partition(":")
    if where != stage:
        return
    only = os.environ.get("PRUNE_FAULT_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "interrupt":
        raise KeyboardInterrupt(f"injected at {stage}")
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {stage})")
    if action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if action == "term_launcher":
        import time

        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(120)  # the launcher's SIGTERM to this rank ends the wait
        return
    raise ValueError(f"PRUNE_FAULT={spec!r}: action must be kill, interrupt, term, term_launcher or enospc")


def checkpoint(stage: str) -> None:
    """Deprecated name of :func:`fault_point` (0.1.0); removed in 0.3."""
    import warnings

    warnings.warn("prune.faults.checkpoint is now prune.core.faults.fault_point", DeprecationWarning, stacklevel=2)
    fault_point(stage)
