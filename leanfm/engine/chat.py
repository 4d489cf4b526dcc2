"""A multi-turn chat on the serving engine, using the model's chat template.

Each turn's prompt starts with the previous turns, so the engine's prefix cache serves most of it.
"""

from __future__ import annotations

from collections.abc import Iterator

from leanfm.engine.llm import LLM
from leanfm.engine.params import SamplingParams


class ChatSession:
    def __init__(self, model, tokenizer, params: SamplingParams, system: str | None = None, **engine_options):
        self.llm = LLM(model, tokenizer, **{"max_num_seqs": 1, **engine_options})
        self.tokenizer = tokenizer
        self.params = params
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        # the template writes BOS itself when the model wants one
        return self.tokenizer.encode(text, add_special_tokens=False)

    def send(self, user_text: str) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply; the reply joins the history."""
        self.messages.append({"role": "user", "content": user_text})
        reply = []
        for out in self.llm.stream(self.prompt_ids(), self.params):
            if out.new_text:
                reply.append(out.new_text)
                yield out.new_text
        self.messages.append({"role": "assistant", "content": "".join(reply).strip()})
