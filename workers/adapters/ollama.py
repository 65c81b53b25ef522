"""What Ollama needs to import a model: its chat template in Ollama's Go template syntax, stops, a Modelfile.

A Hugging Face chat template is Jinja, and arbitrary Jinja has no translation into Go templates. So the template is
not translated: its family is recognised. `detect_family` renders a probe conversation (system, user, assistant,
user, then the generation prompt) through the tokenizer's own `apply_chat_template` and looks for each known
family's markers in the text. Each `Family` holds the Go template Ollama is given (written as Ollama's own library
writes them: `.System` where the family puts the system prompt, `range .Messages` for the turns) and `render`, a
Python function that renders a conversation exactly as that Go template does. The tests check, family by family, that
`render` equals the tokenizer's rendering; the runner checks it again on the base's own template and says where the
two part.

Ollama hands a template `.System` (every system message, joined by blank lines) and `.Messages` (the conversation,
consecutive messages of one role joined by blank lines, system messages still in it): `collate` does the same here.
Ollama's tokenizer adds the BOS token itself, so no template writes it first; one the Jinja template writes before
the first turn is left out where the two renderings are compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.generation.stops import stop_tokens

# Ollama takes safetensors adapters (ADAPTER) only for these base architectures (its import docs).
ADAPTER_BASES = "Llama (Llama 2, 3, 3.1, 3.2), Mistral (Mistral 1, 2, Mixtral) and Gemma (Gemma 1, 2)"

PROBE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "Name a colour"},
]
SENTINEL = "\ue000"  # a private-use character: where a system prompt goes in a family's rendering
PROBE_EXCERPT = 200  # characters of an unrecognised probe rendering quoted in the error

Message = dict[str, str]


class UnknownTemplate(ValueError):
    """The chat template matches none of the families Ollama has a Go template for."""


def collate(messages: list[Message]) -> tuple[str, list[Message]]:
    """The system prompt and the turns as Ollama hands them to a template (its template.collate)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns: list[Message] = []
    for message in messages:
        if turns and turns[-1]["role"] == message["role"]:
            turns[-1] = {**turns[-1], "content": turns[-1]["content"] + "\n\n" + message["content"]}
        else:
            turns.append(dict(message))
    return "\n\n".join(system), turns


def _dialogue(turns: list[Message]) -> list[Message]:
    return [t for t in turns if t["role"] in ("user", "assistant")]


# --- the families: a Go template, and the same rendering in Python --------------------------------------

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""


def render_llama3(messages: list[Message]) -> str:
    system, turns = collate(messages)
    head = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    body = "".join(f"<|start_header_id|>{t['role']}<|end_header_id|>\n\n{t['content']}<|eot_id|>" for t in _dialogue(turns))
    return head + body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""


def render_chatml(messages: list[Message]) -> str:
    system, turns = collate(messages)
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    body = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in _dialogue(turns))
    return head + body + "<|im_start|>assistant\n"


# Gemma has no system role: the system prompt opens the first user turn (as Gemma 3's own template does).
GEMMA = """{{- $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""


def _system_in_first_user(messages: list[Message], user: str, assistant: str) -> str:
    """Families with no system turn: the system prompt opens the first user message, then a blank line. `user`
    and `assistant` are format strings of one turn (`{content}`)."""
    system, turns = collate(messages)
    out = ""
    for turn in _dialogue(turns):
        if turn["role"] == "user":
            prefix = f"{system}\n\n" if system else ""
            system = ""
            out += user.format(content=prefix + turn["content"])
        else:
            out += assistant.format(content=turn["content"])
    return out


def render_gemma(messages: list[Message]) -> str:
    return _system_in_first_user(messages, "<start_of_turn>user\n{content}<end_of_turn>\n",
                                 "<start_of_turn>model\n{content}<end_of_turn>\n") + "<start_of_turn>model\n"


PHI3 = """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|user|>
{{ .Content }}<|end|>
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}<|end|>
{{ end }}
{{- end }}<|assistant|>
"""


def _tagged_turns(messages: list[Message], end: str) -> str:
    """Phi-3 and Zephyr: `<|role|>` headers, each turn closed by `end`."""
    system, turns = collate(messages)
    head = f"<|system|>\n{system}{end}\n" if system else ""
    body = "".join(f"<|{t['role']}|>\n{t['content']}{end}\n" for t in _dialogue(turns))
    return head + body + "<|assistant|>\n"


def render_phi3(messages: list[Message]) -> str:
    return _tagged_turns(messages, "<|end|>")


ZEPHYR = """{{- if .System }}<|system|>
{{ .System }}</s>
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|user|>
{{ .Content }}</s>
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}</s>
{{ end }}
{{- end }}<|assistant|>
"""


def render_zephyr(messages: list[Message]) -> str:
    return _tagged_turns(messages, "</s>")


# Llama 2 writes BOS before every user turn but the first, and the system prompt inside the first one.
LLAMA2 = """{{- $first := true }}{{ $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}{{ if not $first }}<s>{{ end }}[INST] {{ if $system }}<<SYS>>
{{ $system }}
<</SYS>>

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }} {{ .Content }} </s>{{ $first = false }}
{{- end }}
{{- end }}"""


def render_llama2(messages: list[Message]) -> str:
    system, turns = collate(messages)
    out, first = "", True
    for turn in _dialogue(turns):
        if turn["role"] == "user":
            bos = "" if first else "<s>"
            prefix = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
            system = ""
            out += f"{bos}[INST] {prefix}{turn['content']} [/INST]"
        else:
            out += f" {turn['content']} </s>"
        first = False
    return out


# Mistral's instruct template (v0.1, v0.2): the system prompt opens the first user turn.
MISTRAL = """{{- $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }}{{ .Content }}</s>
{{- end }}
{{- end }}"""


def render_mistral(messages: list[Message]) -> str:
    return _system_in_first_user(messages, "[INST] {content} [/INST]", "{content}</s>")


@dataclass(frozen=True)
class Family:
    name: str
    markers: tuple[str, ...]  # all of them are in its probe rendering
    template: str  # Ollama's Go template
    render: Callable[[list[Message]], str]  # what `template` renders for a conversation, generation prompt included
    stops: tuple[str, ...]  # its end of turn, and what opens the next turn (where a model runs on)


# In the order they are tried: a family whose markers another's include comes first (Llama 2 before Mistral,
# Phi-3 before Zephyr).
FAMILIES: tuple[Family, ...] = (
    Family("llama3", ("<|start_header_id|>", "<|end_header_id|>"), LLAMA3, render_llama3,
           ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    Family("chatml", ("<|im_start|>",), CHATML, render_chatml, ("<|im_end|>", "<|im_start|>")),
    Family("gemma", ("<start_of_turn>",), GEMMA, render_gemma, ("<end_of_turn>", "<start_of_turn>")),
    Family("phi3", ("<|user|>", "<|end|>"), PHI3, render_phi3, ("<|end|>", "<|user|>", "<|assistant|>")),
    Family("zephyr", ("<|user|>",), ZEPHYR, render_zephyr, ("</s>", "<|user|>", "<|assistant|>")),
    Family("llama2", ("[INST]", "<<SYS>>"), LLAMA2, render_llama2, ("</s>", "[INST]", "[/INST]")),
    Family("mistral", ("[INST]",), MISTRAL, render_mistral, ("</s>", "[INST]", "[/INST]")),
)
BY_NAME = {family.name: family for family in FAMILIES}


@dataclass(frozen=True)
class Detected:
    family: Family
    rendered: str  # the tokenizer's rendering of the probe, its leading BOS left out
    probe: list[Message]  # the probe rendered (without its system message where the template refuses one)

    def mismatch(self) -> str | None:
        """Where the family's Go template renders the probe otherwise than the tokenizer; None where they agree."""
        ours = self.family.render(self.probe)
        if ours == self.rendered:
            return None
        at = next((i for i, (a, b) in enumerate(zip(ours, self.rendered, strict=False)) if a != b), min(len(ours), len(self.rendered)))
        return f"from character {at}: the base's template writes {self.rendered[at:at + 40]!r}, Ollama's {ours[at:at + 40]!r}"


def default_system(tokenizer: Any, family: Family) -> str | None:
    """The system prompt the base's template writes where a conversation has none (Qwen's does), which Ollama's
    template writes only when given one (the Modelfile's SYSTEM); None where it writes none."""
    conversation = [{"role": "user", "content": PROBE[1]["content"]}]
    try:
        theirs = render_probe(tokenizer, conversation)
    except Exception:  # a template may refuse a lone user message: nothing to learn from it
        return None
    if theirs == family.render(conversation):
        return None
    before, _, after = family.render([{"role": "system", "content": SENTINEL}, *conversation]).partition(SENTINEL)
    if len(theirs) > len(before) + len(after) and theirs.startswith(before) and theirs.endswith(after):
        return theirs[len(before):len(theirs) - len(after)]
    return None


def render_probe(tokenizer: Any, probe: list[Message]) -> str:
    """The tokenizer's own rendering of a conversation with the generation prompt, without a leading BOS."""
    text = str(tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True))
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def detect_family(tokenizer: Any) -> Detected | None:
    """The family of the tokenizer's chat template; None where it has none. Raises UnknownTemplate otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = PROBE
    try:
        rendered = render_probe(tokenizer, probe)
    except Exception:  # a template may refuse a system message (Gemma 1 and 2, Mistral v0.1 raise)
        probe = [m for m in PROBE if m["role"] != "system"]
        try:
            rendered = render_probe(tokenizer, probe)
        except Exception as exc:  # jinja raises several kinds
            raise UnknownTemplate(f"the chat template fails on a probe conversation (system, user, assistant, user): {exc}") from exc
    for family in FAMILIES:
        if all(marker in rendered for marker in family.markers):
            return Detected(family, rendered, probe)
    known = ", ".join(f"{f.name} ({' '.join(f.markers)})" for f in FAMILIES)
    raise UnknownTemplate(
        f"the chat template matches no family Ollama has a template for; it renders a probe conversation as "
        f"{rendered[:PROBE_EXCERPT]!r}; known families: {known}"
    )


def stop_strings(tokenizer: Any, generation_config: Any, family: Family | None) -> list[str]:
    """PARAMETER stop values: every EOS and the template's turn end (workers.generation.stops), then the family's."""
    model = type("Model", (), {"generation_config": generation_config})()
    found = [stop.text for stop in stop_tokens(tokenizer, model).stops]
    return list(dict.fromkeys([*found, *(family.stops if family else ())]))


# --- the files -----------------------------------------------------------------------------------------


def quoted(text: str) -> str:
    """A Modelfile argument in double quotes (Ollama's parser reads backslash escapes in them)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(
    source: str,
    adapter: str | None,
    family: Family | None,
    stops: list[str],
    system: str = "",
    temperature: float | None = None,
    top_p: float | None = None,
) -> str:
    """The Modelfile: FROM (and ADAPTER), TEMPLATE, one PARAMETER stop per stop, the sampling asked for, SYSTEM."""
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if family is not None:
        lines.append(f'TEMPLATE """{family.template}"""')
    lines += [f"PARAMETER stop {quoted(stop)}" for stop in stops]
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature:g}")
    if top_p is not None:
        lines.append(f"PARAMETER top_p {top_p:g}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def readme(name: str, form: str, base_name: str, family: Family | None, quantize: str, description: str) -> str:
    """The folder's README.md: what it holds and the exact commands that import and run it."""
    quant = f" --quantize {quantize}" if quantize else ""
    lines = [
        f"# {name}",
        "",
        description,
        "",
        "Import it into Ollama from this folder, then run it:",
        "",
        "```sh",
        f"ollama create {name}{quant} -f Modelfile",
        f"ollama run {name}",
        "```",
        "",
    ]
    if form == "merged":
        lines += [
            "The folder holds the base model with the adapter merged into its weights, in safetensors (`FROM .`): "
            "Ollama converts it when it imports it. No GGUF file is written here.",
        ]
        if quantize:
            lines += ["", f"`--quantize {quantize}` quantizes the weights as Ollama imports them."]
    else:
        lines += [
            f"The Modelfile applies the LoRA adapter in `adapter/` (safetensors) to `{base_name}` (`FROM`), which "
            "must be the very base the adapter was trained on, unquantized; replace it with the name Ollama knows "
            "that base by (or a path to its folder) where they differ.",
            "",
            f"Ollama takes safetensors adapters for {ADAPTER_BASES} bases only.",
        ]
    lines += [""]
    if family is None:
        lines += ["The base has no chat template: the Modelfile sets none, and the model completes plain text."]
    else:
        lines += [f"The chat template is Ollama's {family.name} template (TEMPLATE), recognised from the base's own."]
    return "\n".join(lines) + "\n"
