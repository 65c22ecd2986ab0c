"""Chat-style records, as TRL users bring them: ``messages`` lists of ``{"role", "content"}``.

What each stage reads from a record (``field`` names are the ``DataConfig`` ones):

    SFT         prompt + response strings; or ``messages`` (the last message, an assistant turn, is
                the response; the ones before it the prompt); or prompt and response as message
                lists (TRL's conversational prompt-completion format)
    preference  prompt + chosen + rejected strings; or chosen and rejected as message lists, with
                the prompt as a message list or implicit (TRL: the messages chosen and rejected
                share before their last, assistant, turn)
    prompt      a prompt string; or a prompt message list, or ``messages`` (no assistant turn last)

Conversations are rendered with the tokenizer's chat template (``apply_chat_template``, the prompt
with ``add_generation_prompt=True``), and the response is what the whole conversation renders to
after the rendered prompt, so prompt + response tokens are the conversation's own. A tokenizer
without a chat template has one well-defined fallback: a single user message as the prompt and a
single assistant message as the response stand for their contents; anything else (a system
message, several turns) is a ValueError naming the record.

Structure is checked without a tokenizer (``parts_of``), so the trainers validate every record
before any model is built (``rlhf_fast.trainers._build.check_data_files``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from rlhf_fast.data.records import Record

KINDS = ("sft", "preference", "prompt")


@dataclass(frozen=True)
class Parts:
    """One record's pieces. ``prompt``: a string or a message list; ``responses``: one entry
    (SFT), two (preference: chosen, rejected) or none (prompt data), each a string or a message
    list (the same form as the prompt); ``chat``: whether they are messages."""

    prompt: object
    responses: tuple
    chat: bool


def _messages(rec: Record, field: str, value) -> list[dict]:
    """``value`` checked as a non-empty list of {"role": str, "content": str} dicts."""
    where = f"{rec.origin}: field {field!r}"
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ValueError(f"{where}: message {i} must be a dict with 'role' and 'content', got {got}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; roles are strings (system, user, assistant)")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i} has content of type {type(m['content']).__name__}; only text "
                             "(a string) is supported")
    return value


def _is_list(rec: Record, field: str) -> bool:
    return isinstance(rec.data.get(field), list)


def _text_or_messages(rec: Record, field: str):
    return _messages(rec, field, rec.data[field]) if _is_list(rec, field) else rec.text(field)


def _ends_with_assistant(rec: Record, field: str, msgs: list[dict]) -> None:
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"{rec.origin}: field {field!r} must end with an assistant message (the response), "
                         f"it ends with a {msgs[-1]['role']!r} one")


def _prompt_messages(rec: Record, field: str, msgs: list[dict]) -> list[dict]:
    if msgs[-1]["role"] == "assistant":
        raise ValueError(f"{rec.origin}: field {field!r} ends with an assistant message; a prompt ends with the "
                         "turn the policy answers (user)")
    return msgs


def parts_of(rec: Record, kind: str, *, prompt_field: str = "prompt", response_field: str = "response",
             chosen_field: str = "chosen", rejected_field: str = "rejected", messages_field: str = "messages") -> Parts:
    """The prompt and response(s) of ``rec`` for a ``kind`` of data ("sft", "preference",
    "prompt"), in text or chat form; ValueError naming the record and field when a field is
    missing, of the wrong type, empty, or the forms are mixed."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    data = rec.data
    if kind == "prompt":
        if prompt_field not in data and messages_field in data:
            return Parts(_prompt_messages(rec, messages_field, _messages(rec, messages_field, data[messages_field])),
                         (), True)
        prompt = _text_or_messages(rec, prompt_field)
        if isinstance(prompt, list):
            return Parts(_prompt_messages(rec, prompt_field, prompt), (), True)
        return Parts(prompt, (), False)
    if kind == "sft":
        if prompt_field not in data and response_field not in data and messages_field in data:
            msgs = _messages(rec, messages_field, data[messages_field])
            _ends_with_assistant(rec, messages_field, msgs)
            if len(msgs) < 2:
                raise ValueError(f"{rec.origin}: field {messages_field!r} holds only the response; it needs the "
                                 "prompt's messages before it")
            return Parts(msgs[:-1], (msgs[-1:],), True)
        fields = (response_field,)
    else:
        fields = (chosen_field, rejected_field)
    responses = tuple(_text_or_messages(rec, f) for f in fields)
    chat = [isinstance(r, list) for r in responses]
    if any(chat) and not all(chat):
        raise ValueError(f"{rec.origin}: fields {fields} mix text and message lists; give both in one form")
    if not chat[0]:
        return Parts(rec.text(prompt_field), responses, False)
    for f, r in zip(fields, responses):
        _ends_with_assistant(rec, f, r)
    if prompt_field in data:
        prompt = _messages(rec, prompt_field, data[prompt_field]) if _is_list(rec, prompt_field) else None
        if prompt is None:
            raise ValueError(f"{rec.origin}: field {prompt_field!r} must be a message list when {fields[0]!r} is one")
        return Parts(_prompt_messages(rec, prompt_field, prompt), responses, True)
    # implicit prompt (TRL's preference format): the turns the responses share before their last one
    if kind == "sft":
        raise ValueError(f"{rec.origin}: missing field {prompt_field!r}: a message-list {response_field!r} needs the "
                         f"prompt's messages (or give the whole conversation in {messages_field!r})")
    heads = [r[:-1] for r in responses]
    if not heads[0] or any(h != heads[0] for h in heads):
        raise ValueError(f"{rec.origin}: no prompt: field {prompt_field!r} is missing and {fields[0]!r} and "
                         f"{fields[1]!r} do not share the messages before their last (assistant) turn")
    return Parts(heads[0], tuple(r[-1:] for r in responses), True)


def check_records(records: Sequence[Record], kind: str, **fields) -> None:
    """``parts_of`` on every record: the first bad one raises, naming its file and line."""
    for rec in records:
        parts_of(rec, kind, **fields)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _single(msgs: list[dict], role: str) -> Optional[str]:
    return msgs[0]["content"] if len(msgs) == 1 and msgs[0]["role"] == role else None


def render_prompt(tokenizer, prompt: list[dict], *, origin: str) -> tuple[str, bool]:
    """(text, templated) of a prompt conversation: the chat template with the generation prompt
    (templated True: encode it without adding special tokens, the template has them), or without a
    template the lone user message's content."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), True
    text = _single(prompt, "user")
    if text is None:
        roles = [m["role"] for m in prompt]
        raise ValueError(f"{origin}: the tokenizer has no chat template, and a prompt of messages {roles} has no "
                         "plain rendering (only a single user message does): set tokenizer.chat_template, or give "
                         "prompts as strings")
    return text, False


def render_response(tokenizer, prompt: list[dict], response: list[dict], *, origin: str) -> str:
    """The text a response conversation adds after the rendered prompt: the chat template of
    prompt + response minus the template of the prompt (with its generation prompt); ValueError
    when the template does not render the prompt as a prefix of the whole. Without a template: the
    lone assistant message's content."""
    if not has_chat_template(tokenizer):
        text = _single(response, "assistant")
        if text is None or _single(prompt, "user") is None:
            raise ValueError(f"{origin}: the tokenizer has no chat template; only a single user message answered by a "
                             "single assistant message has a plain rendering: set tokenizer.chat_template, or give "
                             "strings")
        return text
    head, _ = render_prompt(tokenizer, prompt, origin=origin)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(head):
        raise ValueError(f"{origin}: the chat template renders the prompt ({head[-60:]!r}...) differently inside the "
                         "whole conversation, so the response cannot be split off it")
    text = full[len(head):]
    if not text.strip():
        raise ValueError(f"{origin}: the response renders to nothing")
    return text


def render_observation(tokenizer, conversation: list[dict], produced: str, observation: str, *, role: str = "tool",
                       origin: str = "environment") -> str:
    """The text an environment appends after a model turn so that the episode reads as the chat
    template renders the conversation (docs/architecture.md, "Multi-turn episodes").

    conversation: the messages so far, the model's turns as assistant messages (their content
    without the end-of-turn token); produced: the episode's text so far (the rendered prompt and the
    model's turns as sampled, end-of-turn tokens included); observation: the environment's message
    content, sent as ``role``. Returns ``apply_chat_template(conversation + [observation],
    add_generation_prompt=True)`` minus ``produced``: the rest of the model's turn markup, the
    observation's and the next assistant turn's header. ValueError naming ``origin`` when the
    template does not render ``produced`` as a prefix (the episode would not be the template's)."""
    if not has_chat_template(tokenizer):
        raise ValueError(f"{origin}: the tokenizer has no chat template to render the observation with")
    full = tokenizer.apply_chat_template(conversation + [{"role": role, "content": observation}], tokenize=False,
                                         add_generation_prompt=True)
    if not full.startswith(produced):
        raise ValueError(f"{origin}: the chat template renders the conversation ({full[:80]!r}...) differently from "
                         f"the episode so far ({produced[-60:]!r}): the observation cannot be appended consistently")
    return full[len(produced):]
