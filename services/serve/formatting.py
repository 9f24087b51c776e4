"""OpenAI response bodies, whole and streamed, for completions and chat; chat prompts.

A model whose tokenizer has a chat template (the default SmolLM2-135M-Instruct) gets its own
template, rendered by `models.weights.chat.encode_chat` so that message text never becomes control tokens;
it stops at the template's end-of-turn token (its EOS). Models without one (the 4M code model) get
a comment-style prompt: system/user/developer turns become Python comment lines, an assistant turn
is code, and the model continues with code:

    # user: write a function that adds two numbers
    <assistant code>
"""

from __future__ import annotations

from services.serve.api import new_id, now, usage


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """The prompt's token ids: the tokenizer's chat template when it has one, else `chat_prompt`."""
    from models.weights.chat import encode_chat, has_chat_template
    from models.weights.tokenizer import encode_text

    if not has_chat_template(tokenizer):
        return encode_text(tokenizer, chat_prompt(messages))
    # templates know system/user/assistant; OpenAI's "developer" turn is the system turn
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
    return encode_chat(tokenizer, turns)


def chat_prompt(messages) -> str:
    lines = []
    for m in messages:
        if m.role == "assistant":
            lines.append(m.content.rstrip("\n"))
        else:
            lines.extend(f"# {m.role}: {line}".rstrip() for line in (m.content.splitlines() or [""]))
    return "\n".join(lines) + "\n"


def _usage(item: dict) -> dict:
    out = usage(item["prompt_tokens"], item["completion_tokens"], item["speculation"])
    out["prompt_tokens_details"] = {"cached_tokens": item.get("cached_tokens", 0)}
    return out


class _Formatter:
    object_whole = object_chunk = ""

    def __init__(self, tokenizer, logprobs: int | None):
        self.tokenizer, self.logprobs = tokenizer, logprobs

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def whole(self, items: list[dict], model: str) -> dict:
        text = "".join(i["text"] for i in items)
        last = items[-1]
        entries = [e for i in items for e in (i.get("logprobs") or [])]
        return {"id": new_id(self.id_prefix), "object": self.object_whole, "created": now(), "model": model,
                "choices": [self.choice(text, last["finish_reason"], entries)], "usage": _usage(last)}

    def chunks(self, item: dict, response_id: str, model: str) -> list[dict]:
        if not item["text"] and not item["finished"] and not item.get("logprobs"):
            return []
        choice = self.delta(item["text"], item["finish_reason"] if item["finished"] else None,
                            item.get("logprobs") or [])
        return [{"id": response_id, "object": self.object_chunk, "created": now(), "model": model,
                 "choices": [choice]}]

    def usage_chunk(self, last: dict, response_id: str, model: str) -> dict:
        return {"id": response_id, "object": self.object_chunk, "created": now(), "model": model, "choices": [],
                "usage": _usage(last)}


class CompletionFormatter(_Formatter):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if self.logprobs is None:
            return None
        tokens = [self._token(e["token_id"]) for e in entries]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{self._token(t): lp for t, lp in e["top"]} for e in entries],
                "text_offset": offsets}

    def choice(self, text: str, finish_reason: str | None, entries: list[dict]) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": self._logprobs(entries)}

    delta = choice


class ChatFormatter(_Formatter):
    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if self.logprobs is None:
            return None

        def one(token_id: int, logprob: float) -> dict:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                            for e in entries]}

    def choice(self, text: str, finish_reason: str | None, entries: list[dict]) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                "logprobs": self._logprobs(entries)}

    def delta(self, text: str, finish_reason: str | None, entries: list[dict]) -> dict:
        return {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                "logprobs": self._logprobs(entries)}
