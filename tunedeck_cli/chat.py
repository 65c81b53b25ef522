"""`tunedeck chat`: a chat session from the terminal (the playground's, over the REST API).

The model is loaded once on a worker; each line typed (or each `-m` message) is answered by every column.
With one column the answer streams as it is written; with several, each column's answer is printed once it is
complete, under its name, while a line on stderr counts what has come. The session is closed on exit (the
model unloaded) unless `--keep`; `--session ID` goes on with an earlier one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from tunedeck_cli.api import Api, problem_error
from tunedeck_cli.errors import FAILED, SERVER, CliError

LOAD_POLL_S = 0.5


def chat(args: argparse.Namespace, api: Api) -> int:
    session = _session(args, api)
    columns = session["columns"]
    labels = {c["key"]: c["label"] for c in columns}
    if not args.json:
        names = ", ".join(c["label"] for c in columns)
        print(f"chat {session['id']} ({names}): {api.server}/chat/{session['id']}/", file=sys.stderr)
    _wait_ready(api, session["id"], args.quiet or args.json)
    failed = False
    try:
        for message in _messages(args):
            answers = _ask(api, session["id"], message, labels, args)
            failed = failed or answers is None
    finally:
        if not args.keep:
            api.post(f"playground/sessions/{session['id']}/close/")
    return FAILED if failed else 0


def _session(args: argparse.Namespace, api: Api) -> dict[str, Any]:
    if args.session:
        return dict(api.get(f"playground/sessions/{args.session}/"))
    body: dict[str, Any] = {"adapters": args.adapter or [], "include_base": not args.no_base,
                            "system_prompt": args.system or "", "title": args.title or ""}
    if args.base_model:
        body["base_model"] = args.base_model
    for name in ("temperature", "top_p", "max_new_tokens", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    return dict(api.post("playground/sessions/", body).json())


def _wait_ready(api: Api, session_id: int, quiet: bool) -> None:
    """Show the model's loading (with its time) until it is ready; CliError if its job failed."""
    started = time.monotonic()
    while True:
        status = api.get(f"playground/sessions/{session_id}/")["status"]
        if status["state"] in ("ready", "unloaded", "released", "closed"):
            if not quiet:
                print(f"\r{status['text']}".ljust(60), file=sys.stderr)
            return
        if status["state"] == "failed":
            raise CliError(status["text"], FAILED)
        if not quiet:
            print(f"\r{status['text']}… {time.monotonic() - started:.0f} s", end="", file=sys.stderr, flush=True)
        time.sleep(LOAD_POLL_S)


def _messages(args: argparse.Namespace) -> Iterator[str]:
    if args.message:
        yield from args.message
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of each Server-Sent Events message."""
    kind, data = "message", []
    for line in lines:
        if not line:
            if data or kind != "message":
                yield kind, "\n".join(data)
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _ask(api: Api, session_id: int, message: str, labels: dict[str, str],
         args: argparse.Namespace) -> dict[str, dict[str, Any]] | None:
    """Send one message and show its answers as they come; the final answers, or None if the job ended first."""
    live = len(labels) == 1 and not args.json
    texts: dict[str, str] = {key: "" for key in labels}
    finals: dict[str, dict[str, Any]] = {}
    path = f"playground/sessions/{session_id}/messages/"
    try:
        with api.http.stream("POST", path, json={"content": message, "stream": True},
                             headers={"Accept": "text/event-stream"}) as response:
            if response.status_code >= 400:
                response.read()
                raise problem_error(response)
            for kind, data in sse_events(response.iter_lines()):
                if kind == "delta":
                    delta = json.loads(data)
                    column = delta["column"]
                    text = delta.get("replace", texts.get(column, "") + delta.get("text", ""))
                    if live and text.startswith(texts.get(column, "")):
                        print(text[len(texts.get(column, "")):], end="", flush=True)
                    texts[column] = text
                    if not live and not args.quiet and not args.json:
                        counts = " · ".join(f"{labels[k]}: {len(v)} chars" for k, v in texts.items())
                        print(f"\r{counts}"[:200], end="", file=sys.stderr, flush=True)
                elif kind == "answer":
                    answer = json.loads(data)
                    finals[answer["column"]] = answer
                elif kind == "error":
                    print(f"\n{json.loads(data)['detail']}", file=sys.stderr)
                    return None
    except httpx.TransportError as exc:
        raise CliError(f"lost the connection to {api.server}: {exc or type(exc).__name__}", SERVER) from exc
    if args.json:
        # one line per message (JSON Lines), as `runs logs --json` prints events
        print(json.dumps({"message": message, "answers": [finals[k] for k in labels if k in finals]},
                         ensure_ascii=False), flush=True)
    elif live:
        print()
    else:
        print("\r".ljust(80), end="\r", file=sys.stderr)
        for key, label in labels.items():
            answer = finals.get(key, {"text": texts.get(key, ""), "tokens": 0})
            print(f"── {label} ({answer.get('tokens', 0)} tokens{', stopped' if answer.get('stopped') else ''})")
            print(answer["text"])
    return finals


def register(sub: Any, leaf: Any) -> None:
    parser = leaf(sub, "chat", chat, "Chat with a base model and up to four adapters side by side (the model "
                  "stays loaded on a worker while you type). Reads messages from stdin, or -m; closes the session "
                  "on exit unless --keep.")
    parser.add_argument("--adapter", type=int, action="append", help="An adapter's id (repeat, up to 4).")
    parser.add_argument("--base-model", help="The base model (id or name) when chatting with a base alone.")
    parser.add_argument("--no-base", action="store_true", help="Leave the base's own column out.")
    parser.add_argument("--system", help="A system prompt.")
    parser.add_argument("--title", help="The chat's title on its page.")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", dest="top_p", type=float)
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--session", type=int, help="Go on with an earlier chat instead of starting one.")
    parser.add_argument("-m", "--message", action="append", help="A message to send (repeat); else read stdin.")
    parser.add_argument("--keep", action="store_true", help="Keep the model loaded on exit (it is released after "
                        "the server's idle timeout).")
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress on stderr.")
