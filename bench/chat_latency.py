"""Chat playground latency: the first load, then time to first token and decode speed of each later message,
through the runner a chat job runs (workers/adapters/chat.py), in-process, with the model kept loaded.

A Llama-shaped model with random weights (Llama-3.1-8B shape on the GPU; `--tiny` for a small one on the CPU) is
saved with a word-level tokenizer and a minimal chat template, and k random LoRA adapters (r 16 on all 7
projections) are saved beside it. A session with the base column plus the k adapters then answers `--turns`
messages; each message carries the conversation so far (every column keeps its own answers), as the control plane
hands it over. Each message is ~`--message-tokens` tokens; answers are `--new-tokens` tokens, greedy.

Reported per turn: time to first token (from the message's arrival at the worker to the first streamed token of
any column, and of the slowest column), the turn's seconds, tokens/s over all columns, and the prompt length.
Goal (issue 19): after the first load, time to first token <= 1 s for an 8B model on the GPU.

    python bench/chat_latency.py                         # Llama-3.1-8B shape, bf16, base + 4 adapters
    python bench/chat_latency.py --quantization 4bit     # the 4-bit base (dequantized once where it fits)
    python bench/chat_latency.py --tiny --adapters 2     # a tiny Llama on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare_adapters import BOS, EOS, PAD, add_adapters, build_model
from workers.contract.jobspecs import BASE_KEY, PromptRow
from workers.contract.reporter import MemoryReporter
from workers.data.prompts import prompt_ids

TEMPLATE = (
    "{% for m in messages %}<|start|> {{ m['role'] }} <|sep|> {{ m['content'] }} <|eot|> {% endfor %}"
    "{% if add_generation_prompt %}<|start|> assistant <|sep|>{% endif %}"
)
ROLES = ["system", "user", "assistant"]


def tokenizer(vocab_size: int) -> Any:
    """Word-level: every other id named t<id>, so random token ids make readable messages that encode back exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # The special tokens are matched anywhere in a text, so their names must not prefix the words' ("t1" would
    # split "t10").
    special = {PAD: "<pad>", BOS: "<s>", EOS: "</s>", 3: "<unk>", 4: "<|start|>", 5: "<|sep|>", 6: "<|eot|>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
    for offset, word in enumerate(ROLES):
        vocab[word] = vocab_size - 1 - offset  # the role names take the last ids
        del vocab[f"t{vocab_size - 1 - offset}"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=special[PAD],
        bos_token=special[BOS],
        eos_token=special[EOS],
        unk_token="<unk>",
        additional_special_tokens=[special[4], special[5], special[6]],
    )
    fast.chat_template = TEMPLATE
    return fast


def save_model(folder: Path, tiny: bool, adapters: int) -> list[str]:
    """The random model and `adapters` adapters saved; returns the adapters' folders (relative to `folder`)."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    t0 = time.perf_counter()
    model = build_model(tiny, device, torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder / "model", safe_serialization=True)
    tokenizer(model.config.vocab_size).save_pretrained(folder / "model")
    peft_model, _ = add_adapters(model, adapters)
    peft_model.save_pretrained(folder / "adapters")
    found = sorted(p.parent for p in (folder / "adapters").rglob("adapter_config.json"))
    del model, peft_model
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"random model and {adapters} adapters saved in {time.perf_counter() - t0:.1f} s", flush=True)
    return [str(p.relative_to(folder)) for p in found]


def message(rng: random.Random, vocab: int, length: int) -> str:
    return " ".join(f"t{rng.randrange(20, vocab - 10)}" for _ in range(length))


class ChatUser(MemoryReporter):
    """The control plane's side of a session: the next message arrives only once the previous turn is answered,
    carrying every column's conversation with its own earlier answers."""

    def __init__(
        self,
        columns: list[str],
        turns: int,
        message_tokens: int,
        generation: dict[str, Any],
        vocab: int,
        system: str,
        tok: Any,
    ) -> None:
        super().__init__(turns=[])
        self.close_when_done = True
        self.rng, self.tok = random.Random(0), tok
        self.turns_wanted, self.message_tokens, self.generation, self.vocab = turns, message_tokens, generation, vocab
        self.conversations = {c: [{"role": "system", "content": system}] for c in columns}
        self.prompt_tokens: dict[int, int] = {}
        self.answered = 0

    def next_turn(self, after: int, wait: float) -> dict[str, Any]:
        done = [e["data"] for e in self.events if e["kind"] == "chat" and e["data"].get("state") == "answered"]
        for turn in done[self.answered :]:
            for column, answer in turn["answers"].items():
                self.conversations[column].append({"role": "assistant", "content": answer["text"]})
        self.answered = len(done)
        if after >= self.turns_wanted:
            return {"close": True}
        text = message(self.rng, self.vocab, self.message_tokens)
        for conversation in self.conversations.values():
            conversation.append({"role": "user", "content": text})
        first = next(iter(self.conversations.values()))
        self.prompt_tokens[after + 1] = len(prompt_ids(self.tok, PromptRow(turns=first), True))
        return {
            "turn": {
                "index": after + 1,
                "generation": self.generation,
                "conversations": {c: list(v) for c, v in self.conversations.items()},
            }
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--no-base", action="store_true", help="adapters only, no base column")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--message-tokens", type=int, default=60)
    parser.add_argument("--system-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quantization", default="none", choices=["none", "4bit"])
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()

    import torch

    from workers.adapters.chat import run_chat
    from workers.contract.jobspecs import AdapterRef, ChatSpec, LoadParams
    from workers.contract.spec import ModelRef
    from workers.contract.store import ArtifactStore

    with tempfile.TemporaryDirectory(prefix="chat-bench-") as scratch:
        folder = Path(scratch)
        adapter_dirs = save_model(folder, args.tiny, args.adapters)
        store = ArtifactStore(folder)
        vocab = tokenizer(512 if args.tiny else 128256).vocab_size
        spec = ChatSpec(
            job_id=1,
            attempt=1,
            base_model=ModelRef(source=str(folder / "model")),
            adapters=[
                AdapterRef(key=f"a{i}", label=f"adapter {i}", uri=f"store://{d}") for i, d in enumerate(adapter_dirs)
            ],
            include_base=not args.no_base,
            idle_timeout_s=600,
            load=LoadParams(quantization=args.quantization),
        )
        columns = ([BASE_KEY] if not args.no_base else []) + [a.key for a in spec.adapters]
        generation = {"max_new_tokens": args.new_tokens, "temperature": 0.0, "top_p": 1.0, "seed": 0}
        system = message(random.Random(1), vocab, args.system_tokens)
        reporter = ChatUser(
            columns, args.turns, args.message_tokens, generation, vocab, system, tokenizer(512 if args.tiny else 128256)
        )
        t0 = time.perf_counter()
        result = run_chat(spec, reporter, store)
        total = time.perf_counter() - t0
        if result is None:
            print("\n".join(reporter.logs[-10:]))
            raise SystemExit("the chat session failed")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "CPU"
    chats = [e["data"] for e in reporter.events if e["kind"] == "chat"]
    turns = [c for c in chats if c.get("state") == "answered"]
    print(
        f"\n{device}, torch {torch.__version__}; {len(columns)} columns ({', '.join(columns)}), "
        f"quantization {args.quantization}; load {result['load_s']:.1f} s; session {total:.1f} s"
    )
    for line in reporter.logs:
        if "dequantiz" in line.lower() or "compile" in line.lower():
            print("  log:", line)
    print("| turn | prompt tokens (col 1) | first token, fastest column | first token, slowest | turn s | tok/s |")
    print("|---|---|---|---|---|---|")
    rows = []
    for turn in turns:
        answers = turn["answers"].values()
        firsts = [a["first_token_s"] for a in answers if a["first_token_s"] is not None]
        tokens = sum(a["tokens"] for a in answers)
        seconds = max(a["seconds"] for a in answers)
        prompt = reporter.prompt_tokens[turn["turn"]]
        rows.append(
            {
                "turn": turn["turn"],
                "prompt_tokens": prompt,
                "first_token_s": min(firsts),
                "slowest_first_token_s": max(firsts),
                "seconds": seconds,
                "tokens": tokens,
                "tokens_per_s": tokens / max(seconds, 1e-9),
            }
        )
        print(
            f"| {turn['turn']} | {prompt:,} | {min(firsts):.3f} s | {max(firsts):.3f} s | {seconds:.2f} | "
            f"{tokens / max(seconds, 1e-9):,.0f} |"
        )
    later = [r["first_token_s"] for r in rows[1:]] or [rows[0]["first_token_s"]]
    print(
        f"\ntime to first token after the first message: median {statistics.median(later):.3f} s, "
        f"max {max(later):.3f} s (goal <= 1 s on the GPU for an 8B model)"
    )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "device": device,
                    "columns": columns,
                    "load_s": result["load_s"],
                    "quantization": args.quantization,
                    "turns": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
