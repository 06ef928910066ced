"""Component timings of the policy stage on W1 shapes, variants interleaved (docs/performance.md, "Components").

    python benchmarks/policy_components.py [THREADS]     # default 1

Fresh GPT-2 256x4 policy and critic (vocab 4096): one update step's forward + backward with gelu_new or the fused
GELU and with or without dropout; the rollout's no-grad actor and critic forwards over 32 x 48; log-probs and
entropy over full-vocabulary logits; an AdamW step over both models, unfused and fused. Prints best and median.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from functools import partial

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repo_lightning.models.backbone import disable_dropout, fuse_activations, token_scores  # noqa: E402
from repo_lightning.modules.rollout import response_logits  # noqa: E402
from repo_lightning.rl.losses import entropy_from_logits, logprobs_from_logits  # noqa: E402

N, P, T, MB = 32, 16, 32, 8


def timeit(fn, n: int = 7) -> tuple[float, float]:
    """Best and median seconds of ``n`` calls."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def variant(policy, critic, gelu_fused: bool, dropout: bool):
    """Copies of the two models with the fused GELU and / or dropout switched off."""
    p, c = copy.deepcopy(policy), copy.deepcopy(critic)
    for model in (p, c):
        if gelu_fused:
            fuse_activations(model)
        if not dropout:
            disable_dropout(model)
    return p.train(), c.train()


def update_step(p, c, seq, attn) -> None:
    """One minibatch's forward + backward of policy and critic, and the logged entropy."""
    logits = response_logits(p, seq, attn, P)
    logprobs = logprobs_from_logits(logits, seq[:, P:])
    values = token_scores(c, seq, attn)[:, P - 1 : -1]
    (logprobs.mean() + 0.1 * values.square().mean()).backward()
    with torch.no_grad():
        entropy_from_logits(logits.detach(), torch.ones(seq.shape[0], T))


def main() -> None:
    """Run every component three times, interleaved, and print best / median-of-medians in ms."""
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=4096,
        n_positions=128,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    critic_cfg = copy.deepcopy(cfg)
    critic_cfg.num_labels = 1
    policy, critic = GPT2LMHeadModel(cfg), GPT2ForSequenceClassification(critic_cfg)
    seq = torch.randint(3, 4096, (N, P + T))
    attn = torch.ones_like(seq)
    models = {(g, d): variant(policy, critic, g, d) for g in (False, True) for d in (False, True)}
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(3):
        for (g, d), (p, c) in models.items():
            key = f"fwd+bwd policy+critic {MB}x{P + T} gelu_fused={g} dropout={d}"
            results.setdefault(key, []).append(timeit(partial(update_step, p, c, seq[:MB], attn[:MB]), 5))
        p, c = models[(True, False)]
        p.eval(), c.eval()
        with torch.no_grad():
            old = partial(lambda m: logprobs_from_logits(response_logits(m, seq, attn, P), seq[:, P:]), p)
            results.setdefault("no-grad actor forward 32x48 + logprobs", []).append(timeit(old, 3))
            results.setdefault("no-grad critic forward 32x48", []).append(
                timeit(partial(token_scores, c, seq, attn), 3)
            )
            logits = response_logits(p, seq, attn, P)
            lp = partial(logprobs_from_logits, logits, seq[:, P:])
            results.setdefault("logprobs_from_logits 32x32x4096", []).append(timeit(lp))
            ent = partial(entropy_from_logits, logits[:MB], torch.ones(MB, T))
            results.setdefault("entropy_from_logits 8x32x4096", []).append(timeit(ent))
        p.train(), c.train()
        for param in [q for m in (p, c) for q in m.parameters()]:
            param.grad = torch.randn_like(param) * 1e-3
        for fused in (False, True):
            groups = [{"params": list(p.parameters())}, {"params": list(c.parameters())}]
            opt = torch.optim.AdamW(groups, lr=5e-5, fused=fused, weight_decay=0.0)
            opt.step()
            results.setdefault(f"AdamW step 8.5M params fused={fused}", []).append(timeit(opt.step, 5))
    for key, runs in results.items():
        best = min(r[0] for r in runs) * 1e3
        median = statistics.median(r[1] for r in runs) * 1e3
        print(f"{key}: best {best:.1f} ms, median-of-medians {median:.1f} ms")


if __name__ == "__main__":
    main()
