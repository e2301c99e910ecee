"""The paper's prompt: LUFFY's system prompt, "This is the problem: {question}", `<think>`.

SRFT (arXiv 2506.19767, App. "Chat Template") trains and evaluates with LUFFY's prompt:
a system turn asking for a ``<think> ... </think>`` section then the answer in
``\\boxed{}``, the user turn ``This is the problem: {question}``, and the assistant turn
opened with ``<think>``. The prompt is rendered through the tokenizer's own chat template
(``apply_chat_template(..., add_generation_prompt=True)``) and the think prefix is
appended to the rendered text before tokenising, so the model continues inside
``<think>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

# LUFFY's system prompt, as stored in the `prompt` column of Elliott/Openr1-Math-46k-8192
# (the data SRFT trains on) and printed in LUFFY (Yan et al., arXiv 2504.14945), App. C.2
# "System Prompt"; the SRFT paper's Figure A3 shows the same text. Transcribed from those
# public copies (several independent re-uses of the dataset prompt agree word for word);
# not diffed byte-for-byte against the parquet file, which was not reachable from here.
LUFFY_SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing "
    "the final solution. This involves analyzing, summarizing, exploring, reassessing, "
    "and refining your thought process through multiple iterations. Structure your "
    "response into two sections: Thought and Solution. In the Thought section, present "
    'your reasoning using the format: "<think>\n {thoughts} </think>\n". Each thought '
    "should include detailed analysis, brainstorming, verification, and refinement of "
    'ideas. After "</think>\n," in the Solution section, provide the final, logical, and '
    "accurate answer, clearly derived from the exploration in the Thought section. If "
    "applicable, include the answer in \\boxed{} for closed-form results like multiple "
    "choices or mathematical solutions."
)

# User turn of the paper / LUFFY: "User: This is the problem: {QUESTION}".
USER_TEMPLATE = "This is the problem: {question}"

# LUFFY's template ends the generation prompt with "<think>\n" (its evaluation script
# checks `prompt.endswith("<think>\n")`).
THINK_PREFIX = "<think>\n"

# Short system prompt for the synthetic arithmetic task: LUFFY's ~130-token prompt would
# dominate a 48-token sequence. Every word is in the synthetic tokenizer's vocabulary.
SYNTHETIC_SYSTEM_PROMPT = "Think step by step , then put the answer in \\boxed{ } ."


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """The prompt around a question, the same in training, evaluation and `srft-jax sample`.

    system_prompt: the system turn (paper: LUFFY's); "" = no system turn.
    user_template: the user turn with a "{question}" field (paper: "This is the problem: ...").
    think_prefix: text appended after the chat template's generation prompt (paper:
      "<think>\\n"), so the model continues inside its reasoning section.
    """

    system_prompt: str = LUFFY_SYSTEM_PROMPT
    user_template: str = USER_TEMPLATE
    think_prefix: str = THINK_PREFIX

    def __post_init__(self):
        if "{question}" not in self.user_template:
            raise ValueError(f"user_template must contain '{{question}}', "
                             f"got {self.user_template!r}")

    def messages(self, question: str) -> list[dict[str, str]]:
        """Chat messages (system + user) for one question; no system turn when the system
        prompt is empty."""
        user = {"role": "user", "content": self.user_template.format(question=question)}
        return [{"role": "system", "content": self.system_prompt}, user] if self.system_prompt else [user]

    def text(self, tokenizer: Any, question: str) -> str:
        """Prompt text: the chat template with the generation prompt, then the think prefix."""
        text = tokenizer.apply_chat_template(self.messages(question), tokenize=False,
                                             add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
        return text + self.think_prefix

    def ids(self, tokenizer: Any, question: str) -> list[int]:
        """Token ids of the templated prompt, ending with the think prefix."""
        return list(tokenizer(self.text(tokenizer, question), add_special_tokens=False)["input_ids"])

    def question_of(self, content: str) -> str:
        """The bare question of a user turn that may already carry this template's words."""
        return strip_user_template(content, self.user_template)

    def fingerprint(self) -> str:
        """A short hash of the three fields (evaluation caches record what they sampled with)."""
        joined = "\0".join((self.system_prompt, self.user_template, self.think_prefix))
        return hashlib.sha256(joined.encode()).hexdigest()[:16]


PAPER_TEMPLATE = PromptTemplate()
SYNTHETIC_TEMPLATE = PromptTemplate(SYNTHETIC_SYSTEM_PROMPT, USER_TEMPLATE, "<think>")


def strip_user_template(content: str, user_template: str = USER_TEMPLATE) -> str:
    """The bare question from a user turn that may already carry the template's words.

    Rows of the OpenR1 layout store a user turn; it is re-rendered with ``user_template``,
    so a leading "This is the problem:" (or the template's suffix) is removed first to
    avoid doubling it.
    """
    prefix, _, suffix = user_template.partition("{question}")
    text = content.strip()
    if prefix.strip() and text.startswith(prefix.strip()):
        text = text[len(prefix.strip()):]
    if suffix.strip() and text.endswith(suffix.strip()):
        text = text[: -len(suffix.strip())]
    return text.strip()
