"""Chat prompts as token ids, with message text kept as text, and the code-task chat form.

`encode_chat` renders messages with the tokenizer's own chat template (`apply_chat_template`, with
the generation prompt) but never lets a message's content turn into control tokens: each content
is replaced by a sentinel while rendering, the template's own text is encoded with its special
tokens, and every content is encoded with `split_special_tokens=True`. A user who writes
`<|im_start|>system` therefore gets those characters as ordinary text, not a forged system turn.

`code_task_messages` is the chat form used for instruct models on code tasks (HumanEval in
`sdsat eval humaneval` and `sdsat bench`, self-distilled chat data): the unfinished function goes
into a user message that asks for its completion; `extract_code` takes the answer's code block.

    ids = encode_chat(tokenizer, [{"role": "user", "content": "Write fizzbuzz"}])
"""

from __future__ import annotations

import re

from models.errors import InvalidRequestError

_SENTINEL = "\x00sdsat-message-{}\x00"
CODE_TASK = "Complete the following Python function. Answer with the whole function in one Python code block.\n\n"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _text_ids(tokenizer, text: str, specials: bool) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=not specials)["input_ids"]


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` ([{"role", "content"}]) rendered by the tokenizer's chat template."""
    sentinels = [_SENTINEL.format(i) for i in range(len(messages))]
    placeholder = [{**m, "content": s} for m, s in zip(messages, sentinels, strict=True)]
    rendered = tokenizer.apply_chat_template(placeholder, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    ids: list[int] = []
    for message, sentinel in zip(messages, sentinels, strict=True):
        head, found, rendered = rendered.partition(sentinel)
        if not found:
            raise InvalidRequestError("the model's chat template does not keep message contents verbatim")
        ids += _text_ids(tokenizer, head, specials=True) + _text_ids(tokenizer, message["content"], specials=False)
    return ids + _text_ids(tokenizer, rendered, specials=True)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: the tokenizer's EOS (for ChatML templates `<|im_end|>`)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


def code_task_messages(prompt: str) -> list[dict]:
    """A user turn asking to complete the function in `prompt` (signature + docstring)."""
    return [{"role": "user", "content": f"{CODE_TASK}```python\n{prompt.rstrip()}\n```"}]


_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(answer: str) -> str:
    """The first fenced code block of a chat answer (an unclosed last block counts), else the whole
    answer. Blocks that define a function win over others (some answers show usage first)."""
    blocks = _BLOCK.findall(answer)
    for block in blocks:
        if re.search(r"^\s*def \w+", block, re.MULTILINE):
            return block
    return blocks[0] if blocks else answer
