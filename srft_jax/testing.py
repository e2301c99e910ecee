"""Test doubles that ship with the package: a byte-level tokenizer and a scripted policy.

- :func:`make_byte_tokenizer` builds, in process and offline, a ``transformers`` fast
  tokenizer whose tokens are single bytes (plus Qwen's chat special tokens and template),
  so ``decode(encode(text)) == text`` for any text.
- :class:`ScriptedPolicy` answers each prompt with responses scripted per question, so a
  test knows every reward, vote and table cell of an evaluation in advance. It implements
  the :class:`srft_jax.evaluation.harness.Policy` protocol, counts what it generated, and
  can raise after a given number of prompts to simulate an interrupted run.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from srft_jax.evaluation.harness import Completion, Sampling

CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_byte_tokenizer(save_dir: Optional[str] = None) -> Any:
    """A byte-level tokenizer (one token per UTF-8 byte) with a Qwen-style chat template.

    Ids 0..2 are ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos); the 256
    byte tokens follow. Vocabulary size 259.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(CHAT_SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", padding_side="left")
    tokenizer.chat_template = QWEN_STYLE_CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


class ScriptInterrupted(RuntimeError):
    """Raised by :class:`ScriptedPolicy` once its ``fail_after`` budget is used up."""


class ScriptedPolicy:
    """Replays scripted responses: prompt -> the responses of the question it contains.

    Args:
      script: question text -> responses. A prompt is matched to the longest question that
        occurs in its decoded text (the question as the model sees it, so a key may be the
        bare question of a multiple-choice item). Sample ``g`` of a prompt is
        ``responses[g % len(responses)]``, whatever the seed.
      tokenizer: decodes prompts and counts response tokens.
      fail_after: raise :class:`ScriptInterrupted` on a call that starts after this many
        prompts have been answered (None = never).

    Attributes:
      answered: question keys in the order they were answered (one entry per prompt).
      prompts, seeds: the prompt token ids and seeds, in the same order.
      calls: number of ``generate`` calls that returned.
      samplings: the :class:`Sampling` of every call.
    """

    def __init__(self, script: Mapping[str, Sequence[str]], tokenizer: Any,
                 fail_after: Optional[int] = None):
        empty = [q for q, responses in script.items() if not responses]
        if empty:
            raise ValueError(f"script has no responses for {empty[0]!r}")
        self.script = {q: list(r) for q, r in script.items()}
        self.tokenizer = tokenizer
        self.fail_after = fail_after
        self.answered: list[str] = []
        self.prompts: list[list[int]] = []
        self.seeds: list[int] = []
        self.calls = 0
        self.samplings: list[Sampling] = []

    def _question(self, prompt: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(prompt), skip_special_tokens=False)
        matches = [q for q in self.script if q in text]
        if not matches:
            raise KeyError(f"no scripted question occurs in the prompt {text!r}")
        return max(matches, key=len)

    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, seeds: Sequence[int],
                 sampling: Sampling) -> list[list[Completion]]:
        if self.fail_after is not None and len(self.answered) >= self.fail_after:
            raise ScriptInterrupted(f"interrupted after {len(self.answered)} prompts")
        out = []
        for prompt in prompts:
            question = self._question(prompt)
            responses = self.script[question]
            texts = [responses[g % len(responses)] for g in range(num_samples)]
            out.append([Completion(t, len(self.tokenizer(t, add_special_tokens=False)["input_ids"]),
                                   truncated=False) for t in texts])
            self.answered.append(question)
            self.prompts.append(list(prompt))
        self.seeds.extend(int(s) for s in seeds)
        self.calls += 1
        self.samplings.append(sampling)
        return out
