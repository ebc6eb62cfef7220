"""A tokenizer's own chat template, rendered as transformers' apply_chat_template renders it,
and cut into the pieces that carry loss (the assistant's turns) and those that do not.

The environment matches transformers: a sandboxed jinja2 with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `tojson` filter and a `raise_exception` function. It defines no
`strftime_now`, so a template that would print today's date (Llama 3.1 and later) falls back
to its fixed default and the same data prepares to the same bytes on any day.
"""

from __future__ import annotations

import json

from fp8lab.errors import FP8LabError

ASSISTANT = "assistant"


def _raise_exception(message):
    import jinja2.exceptions

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own tojson: jinja2's escapes HTML characters, which would change the text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template; `origin` names where it came from in messages."""

    def __init__(self, source: str, *, origin: str, bos_token: str | None, eos_token: str | None) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.origin = origin
        self._vars = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise FP8LabError(f"chat template of {origin} does not compile: {e}; fix the template") from None
        self._error = jinja2.TemplateError

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, where: str = "") -> str:
        """The template's text for `messages`; `where` ("FILE: line N") starts an error message."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._vars)
        except self._error as e:
            raise FP8LabError(f"{where}: the chat template of {self.origin} refused this conversation: {e}") from None
        except Exception as e:  # a template indexing a missing key, dividing by zero: still the line's fault
            raise FP8LabError(f"{where}: rendering the chat template of {self.origin} failed: "
                              f"{type(e).__name__}: {e}") from None

    def segments(self, messages: list[dict], *, where: str) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive (text, carries loss) pieces: loss on exactly the
        text each assistant turn adds (its content and the template's end-of-turn marker).

        Turn i's text starts where render(messages[:i], add_generation_prompt=True) ends and ends
        where render(messages[:i + 1]) ends; both must be prefixes of the whole rendering.
        """
        full = self.render(messages, where=where)
        pieces, done = [], 0
        for i, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            start = self._prefix(messages[:i], full, add_generation_prompt=True, where=where, turn=i)
            end = self._prefix(messages[: i + 1], full, add_generation_prompt=False, where=where, turn=i)
            if start < done or end < start:
                raise FP8LabError(f"{where}: the chat template of {self.origin} is not incremental (assistant message "
                                  f"{i} renders out of order); loss masking needs one that only appends per message")
            pieces += [(full[done:start], False), (full[start:end], True)]
            done = end
        pieces.append((full[done:], False))
        return [(text, loss) for text, loss in pieces if text]

    def _prefix(self, messages: list[dict], full: str, *, add_generation_prompt: bool, where: str, turn: int) -> int:
        text = self.render(messages, add_generation_prompt=add_generation_prompt, where=where)
        if not full.startswith(text):
            if turn == 0 and add_generation_prompt:
                raise FP8LabError(f"{where}: the conversation opens with an assistant message, whose start the chat "
                                  f"template of {self.origin} does not mark; begin it with a system or user message")
            what = "the generation prompt before" if add_generation_prompt else "the conversation up to"
            raise FP8LabError(f"{where}: the chat template of {self.origin} is not incremental: {what} message {turn} "
                              "is not a prefix of the whole conversation's rendering, so the assistant's tokens cannot "
                              "be located; use a template that only appends per message")
        return len(text)
