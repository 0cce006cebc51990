"""HellaSwag's ``process_docs`` for the local copy: the context lm-eval's own ``hellaswag`` task builds.

lm-eval (``tasks/hellaswag/utils.py``) writes ``preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize())`` and ``preprocess`` of each ending, where ``preprocess`` strips the text, turns
`` [title]`` into ``". "``, deletes bracketed tags and halves double spaces. The shared copy holds the
joined ``query`` with ``ctx_b`` as it was (lowercase: ``"... on a roof. he"``), and 14 rows still hold
bracketed tags. Its ``ctx_b`` is the text after the context's last sentence end when that text begins in
lowercase and does not end a sentence itself (ActivityNet's rows; WikiHow's have no ``ctx_b``, and their last
"sentence" may follow an abbreviation: "dr. brown's bottles ..."): it is capitalised as lm-eval does
(``str.capitalize``), and both the query and the endings go through ``preprocess``.
"""

from __future__ import annotations

import re

_LAST_SENTENCE_END = re.compile(r"^(.*[.!?]\s+)(\S.*)$", re.DOTALL)


def preprocess(text: str) -> str:
    """lm-eval's ``hellaswag.utils.preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def lm_eval_query(query: str) -> str:
    """The local ``query`` as lm-eval's context: its lowercase ``ctx_b`` capitalised, then ``preprocess``."""
    label, sep, ctx = query.partition(": ")
    if not sep:
        label, ctx = "", query
    found = _LAST_SENTENCE_END.match(ctx)
    head, tail = (found.group(1), found.group(2)) if found else ("", ctx)
    if tail[:1].islower() and not ctx.rstrip().endswith((".", "!", "?")):  # a context that ends a sentence has no
        ctx = head + tail.capitalize()                                       # ctx_b (WikiHow's: "... u.s. citizens.")
    return preprocess(f"{label}{sep}{ctx}")


def process_docs(dataset):
    return dataset.map(lambda doc: {"query": lm_eval_query(doc["query"]),
                                    "choices": [preprocess(c) for c in doc["choices"]]})
