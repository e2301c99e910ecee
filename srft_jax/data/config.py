"""Data configuration: where the prompts/demonstrations come from and how they are cut.

Dims: P = prompt length in tokens (left-padded to a prompt bucket), R = response length
(demonstration or rollout, right-padded to a response bucket).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from srft_jax.data.prompts import PromptTemplate, SYNTHETIC_TEMPLATE
from srft_jax.data.tfds_io import TFDS_SCHEME
from srft_jax.shapes import default_buckets


def _check_buckets(name: str, buckets: tuple[int, ...], max_len: int) -> None:
    if not buckets:
        return
    if any(not isinstance(b, int) or b < 1 for b in buckets):
        raise ValueError(f"{name} must hold positive ints, got {buckets}")
    if list(buckets) != sorted(set(buckets)):
        raise ValueError(f"{name} must be strictly increasing, got {buckets}")
    if buckets[-1] < max_len:
        raise ValueError(f"{name} largest bucket {buckets[-1]} is below the max length {max_len}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data (OpenR1-Math-46k-8192 layout) and its prompt.

    Attributes:
      source: local parquet/jsonl/json file or directory, or a Hugging Face dataset id.
      split: split to read (file-name prefix in a directory, or the HF split).
      max_prompt_len: P_max; longer prompts are dropped (paper: 1024).
      max_response_len: R_max; longer demonstrations are dropped (paper: 8192).
      prompt_buckets: allowed padded prompt widths; () = powers of two up to P_max.
      response_buckets: allowed padded response widths; () = powers of two up to R_max.
      seed: seed of the epoch-wise shuffle of prompts.
      shuffle: shuffle prompts each epoch.
      template: the prompt around each question (`PromptTemplate`: system_prompt,
        user_template, think_prefix; paper: LUFFY's system prompt, "This is the problem:
        {question}", "<think>\\n"). Evaluation during training uses the same template.
      end_token: token closing a demonstration; None = the tokenizer's eos token.
      max_rows: read at most this many rows (None = all).
      require_demo: rows without a demonstration are bad rows (SRFT needs one per prompt).
      synthetic_max_operand / synthetic_max_operands: size of the synthetic arithmetic task
        (`source: synthetic` only): operands 0..max_operand, 2..max_operands of them.
      synthetic_max_value: keep only synthetic problems whose running value stays in
        0..synthetic_max_value (9: every number is one digit token); None = no upper bound.
      tfds_data_dir: where `source: tfds:NAME[/CONFIG][:VERSION]` datasets are prepared
        (local or gs://); None = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    """

    source: str = ""
    split: str = "train"
    max_prompt_len: int = 1024
    max_response_len: int = 8192
    prompt_buckets: tuple[int, ...] = ()
    response_buckets: tuple[int, ...] = ()
    seed: int = 0
    shuffle: bool = True
    template: PromptTemplate = dataclasses.field(default_factory=PromptTemplate)
    end_token: Optional[str] = None
    max_rows: Optional[int] = None
    require_demo: bool = True
    synthetic_max_operand: int = 9
    synthetic_max_operands: int = 3
    synthetic_max_value: Optional[int] = None
    tfds_data_dir: Optional[str] = None

    def __post_init__(self):
        if self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1, got {self.max_prompt_len}")
        if self.max_response_len < 1:
            raise ValueError(f"max_response_len must be >= 1, got {self.max_response_len}")
        _check_buckets("prompt_buckets", tuple(self.prompt_buckets), self.max_prompt_len)
        _check_buckets("response_buckets", tuple(self.response_buckets), self.max_response_len)
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {self.max_rows}")
        if self.end_token is not None and not self.end_token:
            raise ValueError("end_token must be None or a non-empty token string")
        if not 0 < self.synthetic_max_operand <= 9:
            raise ValueError(f"synthetic_max_operand must be in 1..9, got {self.synthetic_max_operand}")
        if not 2 <= self.synthetic_max_operands <= 4:
            raise ValueError(f"synthetic_max_operands must be in 2..4, got {self.synthetic_max_operands}")
        if self.synthetic_max_value is not None and not (
                self.synthetic_max_operand <= self.synthetic_max_value <= 99):
            raise ValueError(f"synthetic_max_value must be None or in synthetic_max_operand..99, "
                             f"got {self.synthetic_max_value}")
        if not self.split:
            raise ValueError("split must be a non-empty string")
        if self.tfds_data_dir is not None and not self.source.startswith(TFDS_SCHEME):
            raise ValueError(f"tfds_data_dir is only read for a source '{TFDS_SCHEME}NAME', "
                             f"got source={self.source!r}")
        if self.tfds_data_dir is not None and not self.tfds_data_dir:
            raise ValueError("tfds_data_dir must be None or a non-empty directory")

    @property
    def prompt_widths(self) -> tuple[int, ...]:
        """The padded prompt widths: `prompt_buckets`, or powers of two up to P_max."""
        return tuple(self.prompt_buckets) or default_buckets(self.max_prompt_len)

    @property
    def response_widths(self) -> tuple[int, ...]:
        """The padded response widths: `response_buckets`, or powers of two up to R_max."""
        return tuple(self.response_buckets) or default_buckets(self.max_response_len)

    @classmethod
    def synthetic(cls, source: str = "", **overrides) -> "DataConfig":
        """Preset for the in-process arithmetic task (short prompt, tiny lengths)."""
        values = dict(
            source=source,
            max_prompt_len=48,
            max_response_len=32,
            prompt_buckets=(48,),
            response_buckets=(32,),
            template=SYNTHETIC_TEMPLATE,
        )
        values.update(overrides)
        return cls(**values)
