"""Sampler decode throughput against Hugging Face `generate` on the same weights (CPU, float32).

    python benchmarks/sampler_throughput.py               # about 3 minutes on 2 idle CPU cores
    python benchmarks/sampler_throughput.py --repeats 1   # one timed run of each

Builds a Llama-shaped model with random weights in torch (hidden 768, 12 layers, 12 heads,
MLP 2048, vocab 32000, tied embeddings: 110M parameters), saves it, loads the same weights into
the JAX decoder with `load_pretrained`, and times greedy generation for a batch of 8 random
prompts of 64 tokens, in one process:
  - HF `generate` with its KV cache, exactly 128 new tokens (min_new_tokens, no EOS);
  - `Sampler.generate`, exactly 128 new tokens (no stop ids), after one warm-up call that
    compiles (the compile is not timed: a training run compiles once per shape bucket);
  - `Sampler.generate` with 256 new tokens (same batch) for the scaling ratio.
Each timed call includes the prompt prefill. Runs are interleaved and the best of --repeats
is kept for each (the machine is shared; the best run is the least disturbed one).

Also prints the memory-bandwidth ceiling of greedy decoding on this machine: every decode step
must read all weights plus the KV cache; the rate at which NumPy's BLAS streams the model's
own weight matrices through batch-8 matrix products (the fastest of the three libraries here)
bounds the tokens/s of any implementation, and so the ratio to HF that is reachable at all.

Prints tokens/s for both, then the two comparable numbers:
  ratio   = sampler tokens/s / HF tokens/s     (target >= 2)
  scaling = time(256 new) / time(128 new)       (target <= 2.2)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def build_hf(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def time_hf(hf, tokens: np.ndarray, new: int) -> tuple[float, np.ndarray]:
    import torch

    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
        dt = time.perf_counter() - t
    assert out.shape[1] == tokens.shape[1] + new, out.shape
    return dt, out[:, tokens.shape[1]:].numpy()


def stream_rate(hf, batch: int, repeats: int = 5) -> tuple[float, int]:
    """(bytes/s, weight bytes): best rate of x[batch, in] @ W.T over every 2-D weight of the
    model, in decode order, with NumPy's BLAS (a lower bound on the time of a decode step)."""
    weights = [w.detach().numpy() for name, w in hf.named_parameters() if w.ndim == 2]
    nbytes = sum(w.nbytes for w in weights)
    x = {w.shape[1]: np.ones((batch, w.shape[1]), np.float32) for w in weights}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w in weights:
            x[w.shape[1]] @ w.T
        best = min(best, time.perf_counter() - t)
    return nbytes / best, nbytes


def time_ours(sampler, model, tokens: np.ndarray, new: int) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    out = sampler.generate(model, tokens, np.ones_like(tokens), temperature=0.0, max_new_tokens=new)
    dt = time.perf_counter() - t
    assert (out.lengths == new).all()
    return dt, out.tokens[:, :new]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax
    import torch

    from srft_jax.models.weights import load_pretrained
    from srft_jax.sampler import Sampler, SamplerConfig

    hf = build_hf()
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = load_pretrained(tmp)
    b, p, new = args.batch, args.prompt_len, args.new_tokens
    tokens = np.random.RandomState(0).randint(1, 32000, (b, p)).astype(np.int32)
    sampler = Sampler(SamplerConfig(temperature=0.0, max_new_tokens=2 * new, prompt_buckets=(p,),
                                    response_buckets=(new, 2 * new)), stop_ids=(), pad_id=0)
    print(f"model: Llama-shaped, {n_params / 1e6:.0f}M parameters, float32; batch {b}, prompt {p}, "
          f"{new} new tokens, greedy; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")
    t = time.perf_counter()
    time_ours(sampler, model, tokens, new)
    time_ours(sampler, model, tokens, 2 * new)
    compiles = sampler.stats.compiles  # one prefill + two decode programs
    print(f"sampler warm-up (compiles + runs): {time.perf_counter() - t:.1f}s, "
          f"{compiles} programs compiled")
    time_hf(hf, tokens, 8)  # HF warm-up

    hf_times, ours_times, ours2_times = [], [], []
    for rep in range(args.repeats):
        dt, hf_tokens = time_hf(hf, tokens, new)
        hf_times.append(dt)
        dt, our_tokens = time_ours(sampler, model, tokens, new)
        ours_times.append(dt)
        dt, _ = time_ours(sampler, model, tokens, 2 * new)
        ours2_times.append(dt)
        print(f"run {rep}: HF {hf_times[-1]:.2f}s  sampler {ours_times[-1]:.2f}s  "
              f"sampler({2 * new}) {ours2_times[-1]:.2f}s  (1-min load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    assert sampler.stats.compiles == compiles, "the timed calls must not recompile"
    agree = float(np.mean(np.cumprod(hf_tokens == our_tokens, axis=1).sum(1) / new))
    hf_tps = b * new / min(hf_times)
    our_tps = b * new / min(ours_times)
    print(f"greedy agreement with HF (mean fraction of each row before the first difference): "
          f"{agree:.3f}")
    print(f"HF generate : {hf_tps:8.1f} tokens/s  (best of {len(hf_times)}: {min(hf_times):.2f}s)")
    print(f"sampler     : {our_tps:8.1f} tokens/s  (best of {len(ours_times)}: {min(ours_times):.2f}s)")
    print(f"ratio sampler/HF tokens/s = {our_tps / hf_tps:.2f}  (target >= 2)")
    print(f"scaling time({2 * new})/time({new}) = {min(ours2_times) / min(ours_times):.2f}  "
          f"(target <= 2.2)")
    rate, weight_bytes = stream_rate(hf, b)
    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # the cache holds p + t entries at step t: p + new/2 on average (the least any method reads)
    kv_bytes = 2 * cfg.num_hidden_layers * b * cfg.num_key_value_heads * (p + new // 2) * head_dim * 4
    step = (weight_bytes + kv_bytes) / rate
    ceiling = b / step
    print(f"bandwidth ceiling: a decode step reads {weight_bytes / 1e6:.0f} MB of weights + "
          f"{kv_bytes / 1e6:.0f} MB of KV cache (mean); NumPy streams the weights at {rate / 1e9:.1f} GB/s "
          f"-> >= {step * 1e3:.1f} ms/step, <= {ceiling:.0f} tokens/s (prefill excluded) = "
          f"{ceiling / hf_tps:.2f}x HF; the sampler reaches {our_tps / ceiling:.0%} of it")


if __name__ == "__main__":
    main()
