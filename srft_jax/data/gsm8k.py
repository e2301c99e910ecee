"""GSM8K rows (Cobbe et al. 2021, arXiv 2110.14168): a question and a worked answer.

Every answer is a rationale with calculator annotations, then the final number after
``####``; it becomes a demonstration in the paper's form and a ground truth::

    answer:        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n...\\n#### 72"
    rationale:     "Natalia sold 48/2 = 24 clips in May.\\n..."   (<<...>> removed)
    ground truth:  "72"                                          (1,000 -> 1000)
    demonstration: "Natalia sold 48/2 = 24 clips in May.\\n...\\n</think>\\n\\n\\boxed{72}"

The demonstration continues a prompt that ends with ``<think>`` (the think prefix), so the
model learns ``<think> rationale </think> \\boxed{N}``.

The TFDS catalog's ``gsm8k`` 1.0.0 (``tensorflow_datasets/text/gsm8k``) has the text
features question, answer, annotation (the rationale) and short_answer (N), and the splits
train, test, train_socratic and test_socratic; the Hugging Face ``openai/gsm8k`` rows have
the same question and answer.
"""

from __future__ import annotations

import re
from typing import Optional

FINAL_MARK = "####"
THINK_CLOSE = "</think>"
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def split_answer(answer: str) -> Optional[tuple[str, str]]:
    """``(rationale, final answer)`` of a GSM8K answer; None when it has no ``#### N``."""
    head, mark, tail = answer.rpartition(FINAL_MARK)
    final = tail.strip()
    if not mark or not final:
        return None
    if _THOUSANDS.fullmatch(final):
        final = final.replace(",", "")
    return _CALCULATOR.sub("", head).strip(), final


def demonstration(rationale: str, final: str) -> str:
    """The rationale closed by ``</think>`` and the boxed final answer."""
    return f"{rationale}\n{THINK_CLOSE}\n\n\\boxed{{{final}}}".lstrip()
