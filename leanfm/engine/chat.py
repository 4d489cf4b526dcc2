"""A multi-turn chat over the plain generator, using the model's chat template."""

from __future__ import annotations

from collections.abc import Iterator

from leanfm.engine.generate import Generator
from leanfm.engine.params import SamplingParams


class ChatSession:
    def __init__(self, model, tokenizer, params: SamplingParams, system: str | None = None):
        self.generator = Generator(model, tokenizer)
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
        for event in self.generator.stream(self.prompt_ids(), self.params):
            if event.text:
                reply.append(event.text)
                yield event.text
        self.messages.append({"role": "assistant", "content": "".join(reply).strip()})
