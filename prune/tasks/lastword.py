"""``tinystories_lastword_local``: the exact last word of a story, LAMBADA-style (Paperno et al. 2016).

The text file holds stories separated by ``<|endoftext|>``. Each story becomes one example:
``context`` is the story up to its last word, ``target`` that word (letters and apostrophes; the
punctuation after it is dropped). lm-eval scores ``" " + target`` after ``context``: ``acc`` is 1
when greedy decoding produces the word exactly (every one of its tokens), as in ``lambada_openai``.
Stories whose last word does not follow a space (a quote or a line break before it) are left out,
and so is a document's last piece when no separator closes it (a sample cut at its size limit).
"""

import re

import datasets

SEPARATOR = "<|endoftext|>"
LAST_WORD = re.compile(r" ([A-Za-z][A-Za-z']*)[^A-Za-z']*$")


def split_story(story: str):
    """``(context, target)`` of one story, or None when its last word does not follow a space."""
    match = LAST_WORD.search(story)
    return (story[: match.start()], match.group(1)) if match else None


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """One example per story of every document in ``dataset`` (column ``text``), in file order."""
    rows = []
    for document in dataset["text"]:
        stories = document.split(SEPARATOR)
        if len(stories) > 1 and not document.rstrip().endswith(SEPARATOR):
            stories = stories[:-1]  # the sample's size limit cut its last story: its last word is not the story's
        for story in stories:
            pair = split_story(story.strip())
            if pair:
                rows.append({"context": pair[0], "target": pair[1]})
    return datasets.Dataset.from_list(rows)
