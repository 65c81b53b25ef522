"""Where an answer ends: the model's EOS, and what closes an assistant's turn in its chat template.

A chat model ends its turn with what its template writes after an assistant's message: `<|im_end|>` in ChatML
(and in workers.training.train's fallback template), `<|eot_id|>` in Llama 3, `<end_of_turn>` in Gemma. That is often not
its EOS, so a generation that waits for EOS alone runs on past the answer, into new turns, up to max_new_tokens.

`stop_tokens(tokenizer, model)` renders one exchange through the template and takes what follows the assistant's
message, plus every EOS id (the model's generation config and the tokenizer's). A turn end that is one token of
the vocabulary (an added token) stops a row as EOS does (generate()'s eos_token_id). One that is several tokens
here (the fallback template on a tokenizer without ChatML's tokens) is a stop string: matched on the decoded text
(transformers' StopStringCriteria, or DecodedStopStrings for a vocabulary it cannot read), cut from the answer, and
held back from the stream while it may be starting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

PROBE_ANSWER = "Tunedeck"  # the assistant's message of the probe exchange: one word no template rewrites
END_OF_TURN = "end of turn"
EOS = "EOS"


@dataclass(frozen=True)
class Stop:
    text: str  # as the tokenizer spells it
    token_id: int | None  # None: a stop string, several tokens of this vocabulary
    why: str  # END_OF_TURN or EOS

    def describe(self) -> str:
        where = f"token {self.token_id}" if self.token_id is not None else "text of several tokens"
        return f"{self.text!r} ({where}, {self.why})"


@dataclass
class Stops:
    """The stops of one tokenizer: what generate() is told, and how its ids become an answer.

    Not changed once built (stop_tokens() makes it): token_ids and strings are worked out once, as cut() and
    visible() ask for them on every streamed step."""

    stops: list[Stop]
    tokenizer: Any = field(default=None, repr=False)  # decodes, for stop strings and answers' text

    @cached_property
    def token_ids(self) -> list[int]:
        return [s.token_id for s in self.stops if s.token_id is not None]

    @cached_property
    def strings(self) -> list[str]:
        return [s.text for s in self.stops if s.token_id is None]

    def describe(self) -> str:
        if not self.stops:
            return "Answers stop only at max_new_tokens: neither the model nor its tokenizer names an EOS or a turn end"
        return "Answers stop at " + ", ".join(s.describe() for s in self.stops)

    def as_json(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.stops]

    def generate_options(self) -> dict[str, Any]:
        """generate() keyword arguments: every single-token stop as an EOS id (stops each row on its own)."""
        return {"eos_token_id": list(self.token_ids) or None}  # a copy: the cached list stays as it is

    def criteria(self) -> list[Any]:
        """Stopping criteria of the stop strings (each row stops once its text ends in one): transformers'
        StopStringCriteria, or, for a vocabulary it cannot read (it raises ValueError for a word-level one),
        `DecodedStopStrings`."""
        if not self.strings:
            return []
        from transformers import StopStringCriteria

        try:
            return [StopStringCriteria(self.tokenizer, self.strings)]
        except ValueError:  # it probes how the tokenizer spells text it may have no tokens for
            return [DecodedStopStrings(self.tokenizer, self.strings)]

    def cut(self, ids: list[int]) -> list[int]:
        """`ids` up to and including the token that ends the answer (what follows is padding or run-on)."""
        return self._cut(ids)[0]

    def text(self, ids: list[int]) -> str:
        """The answer's text: decoded without special tokens, ending before its stop string."""
        _, text, _ = self._answer(ids)
        return text

    def answer_tokens(self, ids: list[int]) -> int:
        """How many tokens of the answer are its own, the stop left out."""
        ids, text = self._cut(ids)
        if ids and ids[-1] in self.token_ids:
            return len(ids) - 1
        if not self.strings or text is not None:  # no stop string, or none in the text cut() decoded
            return len(ids)
        text, ended = self._text_and_end(ids)
        if not ended:
            return len(ids)
        return self._last_prefix_within(ids, len(text))

    def visible(self, ids: list[int]) -> tuple[str, bool]:
        """For streaming: the text that is surely the answer's so far, and whether the answer has ended.

        Text that could be the start of a stop string is held back until the next tokens tell."""
        cut, text, ended = self._answer(ids)
        ended = ended or len(cut) < len(ids) or bool(cut and cut[-1] in self.token_ids)
        return (text if ended else self._without_partial_string(text)), ended

    def _cut(self, ids: list[int]) -> tuple[list[int], str | None]:
        """cut(), and the answer's text where looking for a stop string decoded it already and found none
        (None otherwise: no stop strings, a stop token at the end, or a stop string cut off)."""
        stopped = False
        for i, token in enumerate(ids):
            if token in self.token_ids:
                ids, stopped = ids[: i + 1], True
                break
        if not self.strings:
            return ids, None
        text = self._decode(ids)
        if self._string_at(text) is not None:
            return ids[: self._first_prefix_with_a_string(ids)], None
        # With a stop token at the end, the answer's text is decoded without it (_text_and_end).
        return ids, (None if stopped else text)

    def _answer(self, ids: list[int]) -> tuple[list[int], str, bool]:
        """cut(ids), the answer's text, and whether a stop string ended it: decoded once where cut() did."""
        cut, text = self._cut(ids)
        if text is not None:
            return cut, text, False
        return cut, *self._text_and_end(cut)

    # --- the text of stop strings ----------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids) if self.tokenizer is not None else ""

    def _string_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(found) if found else None

    def _text_and_end(self, ids: list[int]) -> tuple[str, bool]:
        if ids and ids[-1] in self.token_ids:
            # Left out by hand: a turn end may be an added token that is not special, which decoding would keep.
            ids = ids[:-1]
        text = self._decode(ids)
        at = self._string_at(text) if self.strings else None
        return (text, False) if at is None else (text[:at], True)

    def _first_prefix_with_a_string(self, ids: list[int]) -> int:
        """The fewest leading tokens whose text holds a stop string (bisection: decoding is costly on long answers)."""
        low, high = 1, len(ids)
        while low < high:
            middle = (low + high) // 2
            if self._string_at(self._decode(ids[:middle])) is None:
                low = middle + 1
            else:
                high = middle
        return low

    def _last_prefix_within(self, ids: list[int], length: int) -> int:
        """The most leading tokens whose text is no longer than `length` characters."""
        low, high = 0, len(ids)
        while low < high:
            middle = (low + high + 1) // 2
            if len(self._decode(ids[:middle])) <= length:
                low = middle
            else:
                high = middle - 1
        return low

    def _without_partial_string(self, text: str) -> str:
        held = max((j for s in self.strings for j in range(1, len(s)) if text.endswith(s[:j])), default=0)
        return text[: len(text) - held]


class DecodedStopStrings:
    """A stopping criterion that matches stop strings on decoded text: a row stops at the step whose new token
    completes one (a stop string that ended earlier, in the prompt, does not count). For any tokenizer that
    decodes; it decodes each row's last tokens twice a step, where StopStringCriteria compares token ids."""

    def __init__(self, tokenizer: Any, strings: list[str]):
        self.tokenizer, self.strings = tokenizer, list(strings)
        # Tokens enough to spell the longest string: each decodes to a character at least, but for special ones.
        self.window = max(len(s) for s in self.strings) + 8

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        tails = input_ids[:, -self.window :].tolist()
        ended = []
        for tail in tails:
            text, before = decode(self.tokenizer, tail), decode(self.tokenizer, tail[:-1])
            ended.append(any(text.rfind(s) >= 0 and text.rfind(s) + len(s) > len(before) for s in self.strings))
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


def decode(tokenizer: Any, ids: list[int]) -> str:
    # No clean-up of spaces: it can rewrite earlier text, and streamed text must only ever grow.
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def stop_tokens(tokenizer: Any, model: Any = None) -> Stops:
    """Where answers end for this tokenizer (its chat template included) and model (its generation config)."""
    eos = eos_ids(tokenizer, model)
    stops = [Stop(_spelling(tokenizer, i), i, EOS) for i in eos]
    closing = turn_end(tokenizer)
    if closing is not None:
        token = tokenizer.get_added_vocab().get(closing)
        if token is None or token not in eos:
            stops.insert(0, Stop(closing, token, END_OF_TURN))
        else:  # the template closes turns with EOS itself (Mistral, Zephyr, the demo template)
            stops = [Stop(s.text, s.token_id, f"{EOS}, {END_OF_TURN}") if s.token_id == token else s for s in stops]
    return Stops(stops, tokenizer)


def eos_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every EOS id: the model's generation config (an int or a list) and the tokenizer's, in that order."""
    config = getattr(model, "generation_config", None)
    named = getattr(config, "eos_token_id", None)
    ids = [named] if isinstance(named, int) else list(named or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def turn_end(tokenizer: Any) -> str | None:
    """What the chat template writes right after an assistant's message: an added token where one follows it,
    else the text up to the next whitespace; None without a template, or where nothing but whitespace follows."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    exchange = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": PROBE_ANSWER}]
    try:
        text = str(tokenizer.apply_chat_template(exchange, tokenize=False))
    except Exception:  # a template may refuse a bare exchange (jinja raises several kinds): no turn end then
        return None
    at = text.rfind(PROBE_ANSWER)
    tail = text[at + len(PROBE_ANSWER) :].lstrip() if at >= 0 else ""
    if not tail:
        return None
    leading = max((token for token in tokenizer.get_added_vocab() if tail.startswith(token)), key=len, default=None)
    return leading or tail.split()[0]


def _spelling(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return str(tokenizer.convert_ids_to_tokens(token_id))
