"""Hugging Face transformers on the float weights leanfm cached (the GGUF dequantized)."""

from __future__ import annotations

import time

import torch

from anchors.common import Window, nll_on_scored


class TransformersRunner:
    name = "transformers"

    def __init__(self, hf_dir, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()

    @torch.inference_mode()
    def window_nll(self, windows: list[Window]) -> tuple[float, int]:
        total, count = 0.0, 0
        for w in windows:  # one window at a time: (T, 262k) float32 logits are 0.5 GB at T = 512
            logits = self.model(torch.tensor([w.ids]), use_cache=False).logits[0]
            nll, n = nll_on_scored(logits, w)
            total, count = total + nll, count + n
        return total, count

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> float:
        """One forward over the prompt (cache built, logits for the last position only) and an argmax."""
        t0 = time.perf_counter()
        out = self.model(torch.tensor([ids]), logits_to_keep=1)
        out.logits[0, -1].argmax()
        return time.perf_counter() - t0

    @torch.inference_mode()
    def _generate(self, ids: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  min_new_tokens=n, max_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - t0, out

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        """Decode rate = (n - 1) / (t(n) - t(1)): the prefill and first token cancel out."""
        x = torch.tensor([ids])
        t1, _ = self._generate(x, 1)
        tn, out = self._generate(x, n)
        assert out.shape[1] == len(ids) + n
        return (n - 1) / (tn - t1), out[0, len(ids):].tolist()
