"""mira's built-in multi-task instruction suite (the embedded default; no files needed).

Eight tasks in four related pairs, so a task graph has something to find:

=================  ==================  ==========================================
pair               task                example
=================  ==================  ==========================================
arithmetic         ``add``             ``23 + 45`` -> ``68``
arithmetic         ``sub``             ``45 - 23`` -> ``22``
reversing          ``reverse_chars``   ``stone`` -> ``enots``
reversing          ``reverse_words``   ``cat dog sun`` -> ``sun dog cat``
letter case        ``upper``           ``stone`` -> ``STONE``
letter case        ``lower``           ``STONE`` -> ``stone``
sorting            ``sort_digits``     ``5 3 9 1`` -> ``1 3 5 9``
sorting            ``sort_letters``    ``stone`` -> ``enost``
=================  ==================  ==========================================

``PRETRAIN_TASKS`` (copy, first letter, word count, repeat) are used only to pre-train
the demo base model, so that it knows the prompt format but none of the eight tasks.
"""
from __future__ import annotations

import random
from typing import Callable

from mira.data.records import Record
from mira.errors import MiraError

WORDS = ("apple bird cake door egg fish goat hat ink jam kite lamp moon nest owl pig queen rain sun tree "
         "umbrella vase wolf box yak zebra stone river cloud green bread chair light music plant sugar table "
         "water dream glass honey lemon mouse paper robot snow tiger").split()

Gen = Callable[[random.Random], tuple[str, str, str]]


def _words(rng: random.Random, lo=2, hi=4) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _sub(rng):
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)


def _reverse_chars(rng):
    w = rng.choice(WORDS)
    return "Reverse the letters of the word.", w, w[::-1]


def _reverse_words(rng):
    ws = _words(rng)
    return "Reverse the order of the words.", " ".join(ws), " ".join(ws[::-1])


def _upper(rng):
    ws = _words(rng, 1, 2)
    return "Write the text in capital letters.", " ".join(ws), " ".join(ws).upper()


def _lower(rng):
    ws = _words(rng, 1, 2)
    return "Write the text in small letters.", " ".join(ws).upper(), " ".join(ws)


def _sort_digits(rng):
    ds = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return "Sort the digits from smallest to largest.", " ".join(map(str, ds)), " ".join(map(str, sorted(ds)))


def _sort_letters(rng):
    w = rng.choice(WORDS)
    return "Sort the letters of the word alphabetically.", w, "".join(sorted(w))


TASKS: dict[str, Gen] = {
    "add": _add, "sub": _sub,
    "reverse_chars": _reverse_chars, "reverse_words": _reverse_words,
    "upper": _upper, "lower": _lower,
    "sort_digits": _sort_digits, "sort_letters": _sort_letters,
}
RELATED_PAIRS = [("add", "sub"), ("reverse_chars", "reverse_words"), ("upper", "lower"), ("sort_digits", "sort_letters")]


def _copy(rng):
    ws = _words(rng, 1, 4)
    return "Repeat the text.", " ".join(ws), " ".join(ws)


def _first_letter(rng):
    w = rng.choice(WORDS)
    return "Write the first letter of the word.", w, w[0]


def _count_words(rng):
    ws = _words(rng, 1, 5)
    return "Count the words.", " ".join(ws), str(len(ws))


def _repeat_number(rng):
    n = rng.randint(0, 999)
    return "Write the number again.", str(n), str(n)


PRETRAIN_TASKS: dict[str, Gen] = {"copy": _copy, "first_letter": _first_letter, "count_words": _count_words,
                                  "repeat_number": _repeat_number}


def generate_suite(n_per_task: int = 200, seed: int = 0, tasks=None, registry: dict[str, Gen] = TASKS) -> list[Record]:
    """``n_per_task`` records of each task, deterministic in ``seed``."""
    names = list(tasks) if tasks else list(registry)
    unknown = [t for t in names if t not in registry]
    if unknown:
        raise MiraError(f"unknown synthetic tasks {unknown}; choose from {sorted(registry)}", where="data.tasks")
    out = []
    for t in names:
        rng = random.Random(f"{seed}:{t}")
        for _ in range(n_per_task):
            instruction, inp, output = registry[t](rng)
            out.append(Record(instruction=instruction, input=inp, output=output, task=t))
    return out
