"""Chat generation from one causal LM, optionally constrained token by token to a JSON schema
with ``outlines``: the one implementation behind the local teacher
(:class:`scope.profiles.teachers.LocalTeacher`) and the chat server (``recipes/serve.py``)."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class ChatOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int


_PROCESSORS: OrderedDict[tuple, object] = OrderedDict()


def compiled_processor(model, tokenizer, schema: dict, keep: int = 16):
    """The ``outlines`` logits processor of a JSON schema, compiled once per tokenizer: compiling a
    large schema's index takes tens of seconds, and it depends on the vocabulary only, so the stages
    of an evaluation (base, SFT, DPO) share it. The schema is compiled as given: its property order
    is the order the answer is written in (the reasoning first)."""
    from outlines import Generator
    from outlines.types import JsonSchema

    key = (tokenizer.name_or_path, len(tokenizer), json.dumps(schema))
    if key not in _PROCESSORS:
        _PROCESSORS[key] = Generator(model, JsonSchema(schema)).logits_processor
        if len(_PROCESSORS) > keep:
            _PROCESSORS.popitem(last=False)
    _PROCESSORS.move_to_end(key)
    return _PROCESSORS[key]


class ChatGenerator:
    """``generate(messages, max_new_tokens, schema, temperature)`` for one model and tokenizer.

    A schema is compiled once into an ``outlines`` generator; the ``max_schemas`` most recently
    used ones are kept. Greedy decoding at ``temperature == 0``, sampling above."""

    def __init__(self, model, tokenizer, max_schemas: int = 16):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_schemas = max_schemas
        self._generators: OrderedDict[str, object] = OrderedDict()

    def constrained(self, schema: dict):
        """An ``outlines`` generator of ``schema`` for this model; the compiled logits processor is
        shared by every model with the same tokenizer (:func:`compiled_processor`)."""
        key = json.dumps(schema)   # property order matters: it is the order of the answer
        if key in self._generators:
            self._generators.move_to_end(key)
        else:
            import outlines
            from outlines.generator import SteerableGenerator

            model = outlines.from_transformers(self.model, self.tokenizer)
            self._generators[key] = SteerableGenerator.from_processor(model, compiled_processor(model, self.tokenizer, schema))
            if len(self._generators) > self.max_schemas:
                self._generators.popitem(last=False)
        return self._generators[key]

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def generate(self, messages: list[dict], max_new_tokens: int, schema: dict | None = None,
                 temperature: float = 0.0) -> ChatOutput:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        sampling = {"do_sample": temperature > 0, **({"temperature": temperature} if temperature > 0 else {})}
        if schema is not None:
            answer = self.constrained(schema)(text, max_new_tokens=max_new_tokens, **sampling)
            return ChatOutput(answer, self._count(text), self._count(answer))
        batch = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                  **sampling)
        new = out[0, batch["input_ids"].shape[1]:]
        return ChatOutput(self.tokenizer.decode(new, skip_special_tokens=True), int(batch["input_ids"].shape[1]),
                          int(new.shape[0]))
