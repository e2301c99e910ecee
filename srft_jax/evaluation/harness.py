"""The evaluation harness: prompts -> samples -> rewards -> metrics, resumable on disk.

    results = evaluate(policy, {"aime24": items, ...}, tokenizer, out_dir, EvalProtocol())

The harness knows nothing of JAX: a :class:`Policy` turns prompt token ids into sampled
responses (:class:`srft_jax.evaluation.policy.ModelPolicy` runs the project's sampler,
:class:`srft_jax.testing.ScriptedPolicy` replays scripted answers). Per benchmark:

1. each item's question (multiple-choice options appended as "A. ..." lines) is rendered
   with the training prompt (system prompt, "This is the problem: {question}", think prefix);
2. items are generated in chunks of ``protocol.batch_size`` sequences (``n`` samples per
   item, ``n`` from ``protocol.num_samples(name)``);
3. every response is scored by the :class:`~srft_jax.rewards.RewardPool` (Math-Verify for
   math, the chosen letter for multiple choice) and its final answer extracted for voting;
4. each finished item is appended to ``out_dir/<name>.jsonl`` and flushed, so a killed run
   loses at most the chunk in flight; a restart skips the items already there. Every line
   carries the protocol settings it was sampled with; a restart with different settings
   into the same directory stops with an error instead of mixing the two.

Every item gets its own sampling seed, a hash of (protocol seed, benchmark, item id); the
project's sampler derives each row's random stream from it, so an item's random draws do not
depend on which items share its batch, on the batch size, or on whether the run was resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Optional, Protocol, Sequence

from srft_jax import eval_metrics
from srft_jax.data.eval_sets import EvalItem, format_question
from srft_jax.data.prompts import PromptTemplate
from srft_jax.faults import RunError
from srft_jax.rewards import DEFAULT_REWARD_TIMEOUT

log = logging.getLogger(__name__)

# Paper protocol (srft-method.md "Evaluation protocol"): avg@32 on AIME24 and AMC.
PAPER_SAMPLES = ("aime24=32", "amc=32")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What a policy samples with: temperature (0 = greedy), nucleus top-p, length cap."""

    temperature: float
    top_p: float
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """How benchmarks are evaluated; the defaults are the paper's protocol.

    Attributes:
      temperature: sampling temperature (paper: 0.6); 0 = greedy.
      top_p: nucleus sampling mass (paper: 1.0 = off).
      max_new_tokens: response length cap (paper: 8192).
      default_samples: samples per item for benchmarks not listed in ``samples`` (paper: 1).
      samples: per-benchmark sample counts as "name=n" (paper: avg@32 on aime24 and amc).
      seed: base sampling seed.
      batch_size: sequences per sampler call (items per call = max(1, batch_size // n)).
      template: the prompt around each question, as in training (`PromptTemplate`).
      reward_timeout: seconds per response for Math-Verify.
      reward_workers: reward worker processes (None = one per CPU core).
    """

    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192
    default_samples: int = 1
    samples: tuple[str, ...] = PAPER_SAMPLES
    seed: int = 0
    batch_size: int = 128
    template: PromptTemplate = PromptTemplate()
    reward_timeout: float = DEFAULT_REWARD_TIMEOUT
    reward_workers: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.default_samples < 1:
            raise ValueError(f"default_samples must be >= 1, got {self.default_samples}")
        parse_samples(self.samples)  # raises naming the bad entry
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.reward_timeout > 0:
            raise ValueError(f"reward_timeout must be > 0 seconds, got {self.reward_timeout}")
        if self.reward_workers is not None and self.reward_workers < 1:
            raise ValueError(f"reward_workers must be >= 1 or None, got {self.reward_workers}")

    def num_samples(self, benchmark: str) -> int:
        return parse_samples(self.samples).get(benchmark, self.default_samples)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_new_tokens)

    def settings(self, benchmark: str) -> dict[str, Any]:
        """What a cached item must agree on to be reused (batch size and workers don't matter)."""
        return {"num_samples": self.num_samples(benchmark), "temperature": self.temperature,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "prompt_sha": self.template.fingerprint()}


def parse_samples(entries: Sequence[str]) -> dict[str, int]:
    """``("aime24=32", "amc=4")`` -> ``{"aime24": 32, "amc": 4}``; ValueError on a bad entry."""
    out: dict[str, int] = {}
    for entry in entries:
        name, sep, value = str(entry).partition("=")
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not sep or not name.strip() or n < 1:
            raise ValueError(f"samples entry {entry!r} must look like 'name=N' with N >= 1")
        out[name.strip()] = n
    return out


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled response: its text (stop token removed), length in tokens, and whether
    it hit the length cap instead of a stop token."""

    text: str
    num_tokens: int
    truncated: bool


class Policy(Protocol):
    """Anything that samples responses: per prompt, ``num_samples`` completions.

    ``seeds`` holds one seed per prompt (int in [0, 2**31)); a policy should draw a
    prompt's samples from its seed alone so that results do not depend on batching.
    """

    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, seeds: Sequence[int],
                 sampling: Sampling) -> list[list[Completion]]:
        ...


@dataclasses.dataclass
class BenchmarkResult:
    """Metrics of one benchmark (fractions in [0, 1]) and its per-item records."""

    name: str
    kind: str
    num_items: int
    num_samples: int
    metrics: dict[str, float]
    mean_length: float
    truncated: float
    no_answer: float
    records: list[dict] = dataclasses.field(repr=False, default_factory=list)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        del out["records"]
        return out


@dataclasses.dataclass
class EvalResults:
    model: str
    protocol: EvalProtocol
    benchmarks: dict[str, BenchmarkResult]

    def accuracies(self) -> dict[str, float]:
        return {name: b.metrics["accuracy"] for name, b in self.benchmarks.items()}


# ---- benchmarks, prompts and answers ---------------------------------------------------------
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def benchmark_path(data_dir: Optional[str], name: str) -> Optional[str]:
    """``data_dir/<name>.jsonl|.json|.parquet`` or ``data_dir/<name>/`` if present, else None."""
    if data_dir is None:
        return None
    for suffix in DATA_SUFFIXES:
        path = os.path.join(data_dir, name + suffix)
        if os.path.isfile(path):
            return path
    path = os.path.join(data_dir, name)
    return path if os.path.isdir(path) else None


def load_benchmarks(names: Sequence[str], data_dir: Optional[str] = None,
                    limit: Optional[int] = None) -> dict[str, list[EvalItem]]:
    """Items of each benchmark, from ``data_dir`` where it has a file, else the HF hub;
    ``limit`` keeps the first N items of each (a cheap subset for in-training evaluation)."""
    from srft_jax.data.eval_sets import load_benchmark

    return {name: load_benchmark(name, path=benchmark_path(data_dir, name), max_items=limit)
            for name in names}


def prompt_ids(tokenizer: Any, item: EvalItem, protocol: EvalProtocol) -> list[int]:
    """Token ids of the training prompt for ``item`` (mc options included in the question)."""
    return protocol.template.ids(tokenizer, format_question(item))


def extract_answer(response: str, kind: str) -> Optional[str]:
    """The final answer a response votes with: the last ``\\boxed{}`` content after
    ``</think>`` (math), or the chosen option letter (mc); None when there is none."""
    from srft_jax.rewards import extract_choice_letter, last_boxed_content, response_tail

    if kind == "mc":
        return extract_choice_letter(response)
    tail = response_tail(response)
    return None if tail is None else last_boxed_content(tail)


def item_seed(seed: int, benchmark: str, item_id: str) -> int:
    """The sampling seed of one item, in [0, 2**31); stable across runs and batchings."""
    digest = hashlib.sha256(f"{seed}:{benchmark}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ---- the on-disk cache ---------------------------------------------------------------------
class CacheMismatch(RunError, ValueError):
    """The output directory holds items sampled with other settings."""


def cache_path(out_dir: str, benchmark: str) -> str:
    return os.path.join(out_dir, f"{benchmark}.jsonl")


def load_cache(path: str, settings: dict[str, Any]) -> dict[str, dict]:
    """Finished items of a benchmark by id. A torn last line (killed mid-write) is ignored;
    a line with other settings raises :class:`CacheMismatch`."""
    records: dict[str, dict] = {}
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: cut short by a kill
                log.warning("%s: ignoring a torn last line", path)
                continue
            raise ValueError(f"{path}:{number} is not valid JSON") from None
        if record.get("settings") != settings:
            raise CacheMismatch(
                f"{path}:{number} was sampled with {record.get('settings')}, this run uses "
                f"{settings}; choose another --out directory or delete the file")
        records[record["id"]] = record
    return records


def append_records(path: str, records: Sequence[dict]) -> None:
    """Append one JSON line per record and flush to disk (a torn last line is dropped first)."""
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_tail(path: str) -> None:
    """Cut a partial last line (no trailing newline) left by a killed writer."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


# ---- the harness ---------------------------------------------------------------------------
def _check_ids(name: str, items: Sequence[EvalItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f"benchmark {name!r} has the item id {item.id!r} twice; ids must be "
                             "unique for resuming")
        seen.add(item.id)


def _item_record(item: EvalItem, completions: Sequence[Completion], rewards: Sequence[float],
                 settings: dict) -> dict:
    return {
        "id": item.id,
        "settings": settings,
        "question": format_question(item),
        "answer": item.answer,
        "responses": [c.text for c in completions],
        "rewards": [float(r) for r in rewards],
        "lengths": [int(c.num_tokens) for c in completions],
        "truncated": [bool(c.truncated) for c in completions],
        "extracted": [extract_answer(c.text, item.kind) for c in completions],
    }


def _generate_chunk(policy: Policy, pool, tokenizer, name: str, chunk: Sequence[EvalItem],
                    protocol: EvalProtocol, settings: dict) -> list[dict]:
    n = settings["num_samples"]
    prompts = [prompt_ids(tokenizer, item, protocol) for item in chunk]
    seeds = [item_seed(protocol.seed, name, item.id) for item in chunk]
    outputs = policy.generate(prompts, n, seeds, protocol.sampling())
    if len(outputs) != len(chunk) or any(len(o) != n for o in outputs):
        raise ValueError(f"policy returned {[len(o) for o in outputs]} completions for "
                         f"{len(chunk)} prompts x {n} samples")
    texts = [c.text for out in outputs for c in out]
    truths = [item.answer for item in chunk for _ in range(n)]
    kinds = [item.kind for item in chunk for _ in range(n)]
    scores = pool.score(texts, truths, kind=kinds)
    return [_item_record(item, outputs[i], scores[i * n:(i + 1) * n], settings)
            for i, item in enumerate(chunk)]


def summarise_benchmark(name: str, kind: str, records: Sequence[dict]) -> BenchmarkResult:
    """Metrics of one benchmark from its item records."""
    rewards = [r["rewards"] for r in records]
    answers = [r["extracted"] for r in records]
    lengths = [x for r in records for x in r["lengths"]]
    truncated = [x for r in records for x in r["truncated"]]
    votes = [a for r in records for a in r["extracted"]]
    return BenchmarkResult(
        name=name, kind=kind, num_items=len(records), num_samples=len(rewards[0]),
        metrics=eval_metrics.summarise(rewards, answers),
        mean_length=sum(lengths) / len(lengths),
        truncated=sum(truncated) / len(truncated),
        no_answer=sum(eval_metrics.normalise_vote(a) is None for a in votes) / len(votes),
        records=list(records),
    )


def evaluate_benchmark(policy: Policy, name: str, items: Sequence[EvalItem], tokenizer: Any,
                       protocol: EvalProtocol, pool, out_dir: Optional[str] = None,
                       write: bool = True, progress: bool = True) -> BenchmarkResult:
    """One benchmark: cached items are reused, the rest generated, scored and appended."""
    from tqdm.auto import tqdm

    if not items:
        raise ValueError(f"benchmark {name!r} has no items")
    _check_ids(name, items)
    kinds = {item.kind for item in items}
    if len(kinds) != 1:
        raise ValueError(f"benchmark {name!r} mixes item kinds {sorted(kinds)}")
    settings = protocol.settings(name)
    n = settings["num_samples"]
    path = cache_path(out_dir, name) if out_dir else None
    done = load_cache(path, settings) if path else {}
    todo = [item for item in items if item.id not in done]
    per_call = max(1, protocol.batch_size // n)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=name, unit="item",
               disable=not progress, dynamic_ncols=True)
    correct = sum(sum(done[i.id]["rewards"]) for i in items if i.id in done)
    scored = n * sum(i.id in done for i in items)
    try:
        for start in range(0, len(todo), per_call):
            chunk = todo[start:start + per_call]
            records = _generate_chunk(policy, pool, tokenizer, name, chunk, protocol, settings)
            if path and write:
                append_records(path, records)
            for record in records:
                done[record["id"]] = record
                correct += sum(record["rewards"])
                scored += n
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{correct / scored:.3f}", refresh=False)
    finally:
        bar.close()
    return summarise_benchmark(name, kinds.pop(), [done[item.id] for item in items])


def evaluate(policy: Policy, benchmarks: dict[str, Sequence[EvalItem]], tokenizer: Any,
             out_dir: Optional[str], protocol: EvalProtocol = EvalProtocol(), *,
             model_name: str = "model", pool=None, write: bool = True,
             progress: bool = True) -> EvalResults:
    """Evaluates ``policy`` on every benchmark; writes results.json and table.md to ``out_dir``.

    ``out_dir=None`` keeps everything in memory (no cache, no files). ``pool``: a
    :class:`~srft_jax.rewards.RewardPool` to reuse (one is started and closed otherwise).
    ``write=False`` reads the cache but writes nothing (non-main hosts of a multi-host run,
    on a shared file system: every host reads a benchmark's cache before its first sampler
    call, and the main host only appends after a sampler call, a collective all hosts join,
    so all hosts see the same finished items and generate the same chunks).
    """
    from srft_jax.evaluation import report
    from srft_jax.rewards import RewardPool

    if out_dir and write:
        os.makedirs(out_dir, exist_ok=True)
    own_pool = pool is None
    if own_pool:
        pool = RewardPool(num_workers=protocol.reward_workers, timeout=protocol.reward_timeout)
    try:
        results = EvalResults(model_name, protocol, {})
        for name, items in benchmarks.items():
            results.benchmarks[name] = evaluate_benchmark(
                policy, name, items, tokenizer, protocol, pool, out_dir, write, progress)
            log.info("%s: accuracy %.4f over %d items x %d samples", name,
                     results.benchmarks[name].metrics["accuracy"], len(items),
                     results.benchmarks[name].num_samples)
    finally:
        if own_pool:
            pool.close()
    if out_dir and write:
        report.write_outputs(results, out_dir)
    return results
