"""Speculative decoding: proposers that draft tokens, and their exact verification by the target model.

How draft tokens flow (DESIGN.md principle 6: one code path; computed tokens catch up with known tokens):

  1. The runner, after sampling a request's token, asks the proposer for up to k drafts when the
     scheduler's chunk said so (ScheduledChunk.num_propose) and returns them in RunnerOutput.draft_token_ids.
  2. The scheduler keeps them on the request (Request.spec_token_ids) and, next step, schedules the last
     sampled token plus the drafts as one chunk (num_draft_tokens = k): its computed tokens catch up with
     its known tokens plus the drafts. The off-switch (SpeculativeConfig.should_speculate) drops them when
     the batch is large.
  3. The runner computes logits for the chunk's k + 1 last rows and verifies (spec.verify): greedy accepts
     the longest prefix equal to the target's argmax, sampling uses rejection sampling; either way one more
     token comes from the target (the correction or the bonus token).
  4. The scheduler rolls back: num_computed_tokens = start + 1 + accepted, KV blocks past it are freed
     (KVCacheManager.truncate), only blocks of final tokens enter the prefix cache, and the accepted tokens
     are appended one by one with the usual stop checks.

Files: config.py (SpeculativeConfig; torch-free), ngram.py (prompt lookup; torch-free), verify.py
(greedy / rejection-sampling verification), draft.py (draft-model and layer-skip proposers with their own
paged KV cache), decoder.py (the runner's speculation state: token histories, the proposer, draft probs).
"""

from leanfm.engine.spec.config import METHODS, SpeculativeConfig, SpeculativeConfigError
from leanfm.engine.spec.ngram import NgramProposer

__all__ = ["METHODS", "NgramProposer", "SpeculativeConfig", "SpeculativeConfigError"]
