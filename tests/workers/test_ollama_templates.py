"""Ollama's Go templates against the chat templates they stand for, family by family (workers/adapters/ollama.py).

Each family's Python renderer (what its Go template writes) must equal the tokenizer's own `apply_chat_template`
for a tokenizer carrying that family's Jinja template, as the models' own repositories ship them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers.adapters import ollama
from workers.data.prompts import FALLBACK_CHAT_TEMPLATE
from workers.training.demo import build_tokenizer

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
GEMMA1 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if "
    "loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL1 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}{% if loop.first and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# (family, Jinja template, tokens the family's tokenizer has as single tokens)
CASES = [
    ("llama3", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("chatml", QWEN, ["<|im_start|>", "<|im_end|>"]),
    ("chatml", FALLBACK_CHAT_TEMPLATE, ["<|im_start|>", "<|im_end|>"]),
    ("gemma", GEMMA1, ["<start_of_turn>", "<end_of_turn>"]),
    ("gemma", GEMMA3, ["<start_of_turn>", "<end_of_turn>"]),
    ("phi3", PHI3, ["<|end|>"]),
    ("zephyr", ZEPHYR, []),
    ("llama2", LLAMA2, []),
    ("mistral", MISTRAL1, []),
    ("mistral", MISTRAL2, []),
]
IDS = [f"{family}-{i}" for i, (family, _, _) in enumerate(CASES)]
CONVERSATIONS = [
    ollama.PROBE,
    [{"role": "user", "content": "Only a question"}],
    [
        {"role": "system", "content": "Answer in French.\nAlways."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Un"},
        {"role": "user", "content": "Two"},
        {"role": "assistant", "content": "Deux"},
        {"role": "user", "content": "Three {{ braces }} and \"quotes\""},
    ],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("family-tokenizers")
    return {
        case_id: build_tokenizer(root / case_id, chat_template=template, extra_special_tokens=tokens)
        for case_id, (_, template, tokens) in zip(IDS, CASES, strict=True)
    }


def refuses_system(tokenizer: object, conversation: list[dict[str, str]]) -> bool:
    try:
        ollama.render_probe(tokenizer, conversation)
    except Exception:
        return True
    return False


@pytest.mark.parametrize(("case_id", "family"), [(i, c[0]) for i, c in zip(IDS, CASES, strict=True)], ids=IDS)
def test_it_recognises_each_family_and_its_go_template_renders_as_the_tokenizer_does(
    tokenizers: dict[str, object], case_id: str, family: str
) -> None:
    tokenizer = tokenizers[case_id]
    detected = ollama.detect_family(tokenizer)
    assert detected is not None and detected.family.name == family
    assert detected.mismatch() is None
    for conversation in CONVERSATIONS:
        if conversation[0]["role"] == "system" and refuses_system(tokenizer, conversation):
            conversation = [m for m in conversation if m["role"] != "system"]
        default = ollama.default_system(tokenizer, detected.family)
        if conversation[0]["role"] != "system" and default:  # Qwen's: what the export writes as SYSTEM
            conversation = [{"role": "system", "content": default}, *conversation]
        assert detected.family.render(conversation) == ollama.render_probe(tokenizer, conversation), conversation


@pytest.mark.parametrize("family", ollama.FAMILIES, ids=[f.name for f in ollama.FAMILIES])
def test_every_go_template_closes_what_it_opens_and_uses_only_ollamas_fields(family: ollama.Family) -> None:
    actions = re.findall(r"{{-?\s*(.*?)\s*-?}}", family.template)
    opened = sum(1 for a in actions if a.startswith(("if ", "range ")))
    assert opened == sum(1 for a in actions if a == "end")
    fields = set(re.findall(r"(?<![\w$])\.(\w+)", family.template))
    assert fields <= {"System", "Messages", "Role", "Content"}
    assert '"""' not in family.template


def test_a_template_of_no_known_family_is_refused_naming_what_was_seen_and_the_families(tmp_path: Path) -> None:
    template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    tokenizer = build_tokenizer(tmp_path, chat_template=template)
    with pytest.raises(ollama.UnknownTemplate) as caught:
        ollama.detect_family(tokenizer)
    message = str(caught.value)
    assert "### system: You are terse." in message
    assert all(f.name in message for f in ollama.FAMILIES)


def test_a_default_system_prompt_of_the_template_is_found_and_no_other(tokenizers: dict[str, object]) -> None:
    defaults = {case_id: ollama.default_system(tokenizer, ollama.detect_family(tokenizer).family)  # type: ignore[union-attr]
                for case_id, tokenizer in tokenizers.items()}
    assert defaults.pop("chatml-1") == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert set(defaults.values()) == {None}


def test_a_template_that_fails_on_the_probe_is_refused_with_its_error(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path, chat_template="{{ raise_exception('only one turn, please') }}")
    with pytest.raises(ollama.UnknownTemplate, match="only one turn, please"):
        ollama.detect_family(tokenizer)


def test_a_tokenizer_without_a_chat_template_has_no_family(tmp_path: Path) -> None:
    assert ollama.detect_family(build_tokenizer(tmp_path, chat_template=None)) is None


def test_a_template_that_only_looks_like_a_family_is_recognised_with_the_difference_named(tmp_path: Path) -> None:
    from workers.training.demo import CHAT_TEMPLATE  # Zephyr's markers, without </s> after user turns

    detected = ollama.detect_family(build_tokenizer(tmp_path, chat_template=CHAT_TEMPLATE))
    assert detected is not None and detected.family.name == "zephyr"
    assert "from character" in (detected.mismatch() or "")


@pytest.mark.parametrize(
    ("case_id", "expected"),
    [("chatml-1", ["<|im_end|>", "</s>", "<|im_start|>"]),
     ("llama3-0", ["<|eot_id|>", "</s>", "<|start_header_id|>", "<|end_header_id|>"]),
     ("gemma-4", ["<end_of_turn>", "</s>", "<start_of_turn>"]),
     ("mistral-9", ["</s>", "[INST]", "[/INST]"])],
)
def test_stops_are_the_eos_the_turn_end_and_the_familys_markers(
    tokenizers: dict[str, object], case_id: str, expected: list[str]
) -> None:
    from transformers import GenerationConfig

    tokenizer = tokenizers[case_id]
    detected = ollama.detect_family(tokenizer)
    assert detected is not None
    generation = GenerationConfig(eos_token_id=tokenizer.eos_token_id)  # type: ignore[attr-defined]
    assert ollama.stop_strings(tokenizer, generation, detected.family) == expected


def test_the_modelfile_carries_the_template_verbatim_and_quotes_what_it_must() -> None:
    family = ollama.BY_NAME["chatml"]
    text = ollama.modelfile(".", None, family, ['<|im_end|>', 'say "stop"'], system="Be brief.", temperature=0.2)
    assert text.startswith("FROM .\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == family.template
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "say \\"stop\\""' in text
    assert "PARAMETER temperature 0.2" in text and "top_p" not in text
    assert 'SYSTEM """Be brief."""' in text
    adapter = ollama.modelfile("llama3.2:1b", "./adapter", None, [])
    assert adapter == "FROM llama3.2:1b\nADAPTER ./adapter\n"
