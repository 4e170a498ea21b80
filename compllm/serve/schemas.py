"""Request and response bodies of the OpenAI chat API, the part compllm implements.

The pipe answers one self-contained question: the *last user message* is the query. System messages and earlier
turns are not sent to the experts (each expert has its own system prompt); the response says how many messages
were set aside (`compllm.ignored_messages`). Sampling fields (temperature, top_p, max_tokens, ...) are accepted
and ignored: every model call is greedy, with the experts' own token caps.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from compllm.serve.errors import bad_request


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: Optional[StrictStr] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[StrictStr, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields compllm does not use are accepted and ignored
    messages: list[Message] = Field(min_length=1)  # validated first: `{}` is told about messages
    model: StrictStr
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    compllm_progress: StrictBool = False  # extension: stream chunks with a `compllm` field for each part's progress

    def query(self) -> tuple[str, int]:
        """(the question, how many other messages were set aside)."""
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            raise bad_request("no message with role 'user': compllm answers the last user message",
                              "messages", "missing_user_message")
        text = self.messages[users[-1]].text().strip()
        if not text:
            raise bad_request(f"messages.{users[-1]}.content is empty: put the question there",
                              f"messages.{users[-1]}.content")
        return text, len(self.messages) - 1


FIELDS = frozenset(name for model in (TextPart, Message, StreamOptions, ChatRequest) for name in model.model_fields)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, answer: str, finish_reason: str, tokens: tuple[int, int],
               extension: dict[str, Any]) -> dict[str, Any]:
    """A `chat.completion` object; `compllm` carries what the pipe did (an extension clients ignore)."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(*tokens), "compllm": extension}


def chunk(cid: str, model: str, created: int, delta: Optional[dict[str, Any]] = None,
          finish_reason: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """A `chat.completion.chunk`; without `delta` it has no choices (a usage or progress chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **extra}
