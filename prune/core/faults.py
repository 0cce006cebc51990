"""Fault injection for the reliability tests: ``PRUNE_FAULT=<stage>:<action>``.

``checkpoint(stage)`` is called at every stage boundary of a run; when the environment
variable names that stage, the action happens there:

* ``kill``       the process dies at once (SIGKILL: no cleanup code runs), like a power cut;
* ``interrupt``  ``KeyboardInterrupt`` (Ctrl-C: cleanup code runs);
* ``enospc``     ``OSError(ENOSPC)``, the disk is full.

Unset (always, outside tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

#: where ``checkpoint`` is called, in run order (``scoring``: after each scored batch;
#: ``evaluating``: between perplexity and lm-eval, for the original and the pruned model)
STAGES = ("loaded", "scoring", "scored", "selected", "evaluating", "evaluated_original", "pruned", "evaluated_pruned",
          "saving", "saved_weights", "before_rename", "swapping", "swapped")


def checkpoint(stage: str) -> None:
    spec = os.environ.get("PRUNE_FAULT")
    if not spec:
        return
    where, _, action = spec.partition(":")
    if where != stage:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "interrupt":
        raise KeyboardInterrupt(f"injected at {stage}")
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {stage})")
    raise ValueError(f"PRUNE_FAULT={spec!r}: action must be kill, interrupt or enospc")
