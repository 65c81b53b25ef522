"""Stop strings with a word-level vocabulary, which transformers' StopStringCriteria cannot read (it raises
ValueError while probing how the tokenizer spells text): the criteria fall back to matching decoded text."""

from __future__ import annotations

from typing import Any

import pytest

from workers.generation.stops import END_OF_TURN, EOS, DecodedStopStrings, Stop, Stops

VOCAB = ["[UNK]", "</s>", "hello", "world", "END", "OF", "TURN", "user", ":"]


@pytest.fixture(scope="module")
def word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="</s>")


def ids(*words: str) -> list[int]:
    return [VOCAB.index(w) for w in words]


def test_a_word_level_vocabulary_stops_at_the_step_that_completes_the_string(word_tokenizer: Any) -> None:
    import torch
    from transformers import StopStringCriteria

    with pytest.raises(ValueError):  # the defect this guards against: the job failed here
        StopStringCriteria(word_tokenizer, ["END OF"])
    stops = Stops([Stop("END OF", None, END_OF_TURN), Stop("</s>", 1, EOS)], word_tokenizer)
    (criterion,) = stops.criteria()
    assert isinstance(criterion, DecodedStopStrings)
    # Row 0: the prompt already holds the string (it does not count), then the answer completes it again.
    # Row 1: the answer never does.
    prompt = ids("user", ":", "END", "OF", "hello")
    answers = [ids("world", "END", "OF", "hello"), ids("world", "hello", "world", "hello")]
    stopped_at = [None, None]
    for step in range(1, 5):
        batch = torch.tensor([prompt + a[:step] for a in answers])
        for row, ended in enumerate(criterion(batch, None).tolist()):
            if ended and stopped_at[row] is None:
                stopped_at[row] = step
    assert stopped_at == [3, None]
    # The answer is cut before the string, as with any stop string.
    assert stops.text(answers[0]) == "world "
    assert stops.answer_tokens(answers[0]) == 1
