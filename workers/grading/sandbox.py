"""The python grader: user code `grade(sample, item) -> float`, run in a separate, limited process per batch.

The code is trusted no further than the process it runs in: the same interpreter in isolated mode (`-I`: no
user site, no PYTHON* variables), an environment holding nothing of the worker's (no TUNEDECK_* variables, no
tokens), a fresh empty working folder, its address space (RLIMIT_AS) and CPU time capped from inside before the
user's code is compiled, each completion's call interrupted at `timeout_seconds`, and the whole process group
killed at a wall-clock limit. A completion whose call fails, overruns or is lost with the process scores 0, and the
reason goes to the grader's `errors`. Admins bound what a definition may ask for with TUNEDECK_GRADER_MAX_SECONDS
and TUNEDECK_GRADER_MAX_MEMORY_MB.
"""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

from workers.config import env_int
from workers.grading.base import BaseGrader, unit_score
from workers.grading.checks import Checker

DEFAULT_SECONDS = 5.0
DEFAULT_MEMORY_MB = 512
MIN_MEMORY_MB = 64  # below this the interpreter itself cannot start
STARTUP_SECONDS = 5.0  # what the wall-clock limit allows beyond the calls themselves (interpreter start, imports)
STDERR_TAIL = 500

# Runs in the child: limits first, then the user's code, then one JSON line per completion on the saved stdout
# (the user's own prints go to stderr, so they cannot break the protocol).
CHILD = r"""
import json, resource, signal, sys
request = json.loads(sys.stdin.read())
memory = request["memory_mb"] << 20
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (request["cpu_seconds"], request["cpu_seconds"] + 1))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
results, sys.stdout = sys.stdout, sys.stderr

class GraderTimeout(BaseException):
    pass

def overrun(signum, frame):
    raise GraderTimeout()

signal.signal(signal.SIGALRM, overrun)
namespace = {"__name__": "grader"}
exec(compile(request["source"], "<grader>", "exec"), namespace)
for sample, item in zip(request["samples"], request["items"]):
    signal.setitimer(signal.ITIMER_REAL, request["timeout_seconds"])
    try:
        line = {"score": float(namespace["grade"](sample, item))}
    except GraderTimeout:
        line = {"error": f"timed out after {request['timeout_seconds']:g}s"}
    except MemoryError:
        line = {"error": f"MemoryError: over the {request['memory_mb']} MiB limit"}
    except BaseException as exc:
        line = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    results.write(json.dumps(line) + "\n")
    results.flush()
"""


def max_seconds() -> int:
    return env_int("TUNEDECK_GRADER_MAX_SECONDS", 30, minimum=1)


def max_memory_mb() -> int:
    return env_int("TUNEDECK_GRADER_MAX_MEMORY_MB", 2048, minimum=MIN_MEMORY_MB)


def source_problem(source: str) -> str | None:
    """Why `source` cannot serve as a grader, or None: it must compile and define grade(sample, item)."""
    try:
        tree = ast.parse(source, "<grader>")
    except SyntaxError as exc:
        return f"line {exc.lineno}: {exc.msg}"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "grade":
            if len(node.args.args) != 2:
                return "grade must take two arguments: grade(sample, item)"
            return None
    return "must define grade(sample, item) at the top level"


def sample_of(completion: str) -> dict[str, Any]:
    """What the user's grade() sees of a completion, as OpenAI's python grader shows it."""
    try:
        output_json = json.loads(completion)
    except ValueError:
        output_json = None
    return {"output_text": completion, "output_json": output_json}


class PythonGrader(BaseGrader):
    """User code `grade(sample, item) -> float`, run apart (see the module docstring); its value clipped to [0, 1]."""

    kind = "python"

    def __init__(self, name: str, source: str, timeout_seconds: float, memory_mb: int):
        super().__init__(name)
        self.source, self.timeout_seconds, self.memory_mb = source, timeout_seconds, memory_mb

    @staticmethod
    def check(c: Checker) -> None:
        c.known("source", "timeout_seconds", "memory_mb")
        source = c.text("source")
        if source is not None and (problem := source_problem(source)):
            c.error("source", problem)
        c.number("timeout_seconds", minimum=0.01, maximum=max_seconds())
        memory = c.number("memory_mb", minimum=MIN_MEMORY_MB, maximum=max_memory_mb())
        if memory is not None and not memory.is_integer():
            c.error("memory_mb", "must be a whole number of MiB")

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> PythonGrader:
        return cls(
            name,
            definition["source"],
            float(definition.get("timeout_seconds", DEFAULT_SECONDS)),
            int(definition.get("memory_mb", DEFAULT_MEMORY_MB)),
        )

    @staticmethod
    def describe(definition: dict[str, Any]) -> str:
        seconds = definition.get("timeout_seconds", DEFAULT_SECONDS)
        memory = definition.get("memory_mb", DEFAULT_MEMORY_MB)
        return f"grade(sample, item) in a separate process, {seconds:g}s a call, {memory:g} MiB"

    def score_batch(self, completions: list[str], items: list[dict]) -> list[float]:
        self.errors = []
        if not completions:
            return []
        lines, failure = self._run(completions, items)
        scores = []
        for index in range(len(completions)):
            line = lines[index] if index < len(lines) else {"error": failure or "no result"}
            if "error" in line:
                self.note(f"completion {index + 1}: {line['error']}")
            score = line.get("score", 0.0)
            scores.append(unit_score(score) if isinstance(score, float) else 0.0)
        return scores

    def _run(self, completions: list[str], items: list[dict]) -> tuple[list[dict[str, Any]], str]:
        """Each completion's result line, and why the process ended early ("" when it did not)."""
        calls = self.timeout_seconds * len(completions)
        request = {
            "source": self.source,
            "samples": [sample_of(completion) for completion in completions],
            "items": items,
            "timeout_seconds": self.timeout_seconds,
            "memory_mb": self.memory_mb,
            "cpu_seconds": math.ceil(calls + STARTUP_SECONDS),
        }
        wall = calls + STARTUP_SECONDS
        with tempfile.TemporaryDirectory(prefix="grader-") as folder:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", CHILD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=folder,
                env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder},
                start_new_session=True,  # its own process group: the kill reaches anything it started
                text=True,
            )
            try:
                stdout, stderr = process.communicate(json.dumps(request, default=str), timeout=wall)
                failure = _exit_reason(process.returncode, stderr)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
                failure = f"killed at the wall-clock limit of {wall:g}s"
        return _result_lines(stdout), failure


def _result_lines(stdout: str) -> list[dict[str, Any]]:
    lines = []
    for line in stdout.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            lines.append(parsed)
    return lines


def _exit_reason(code: int, stderr: str) -> str:
    if code == 0:
        return ""
    tail = stderr.strip().splitlines()[-1][-STDERR_TAIL:] if stderr.strip() else "no message"
    if code < 0:
        return f"the grader process was killed by signal {signal.Signals(-code).name}: {tail}"
    return f"the grader process exited with code {code}: {tail}"
