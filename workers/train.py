"""The train runner: LoRA / QLoRA supervised fine-tuning of a causal LM with trl's SFTTrainer.

`run_training(spec, reporter, store)` is the whole contract: it never touches a database,
it reports through the reporter and writes the adapter into the artifact store.
"""

from __future__ import annotations

import logging
import platform
import time
import traceback
from dataclasses import dataclass
from typing import Any

from transformers import PrinterCallback, TrainerCallback

from workers.client import StaleAttempt
from workers.datasets import DatasetError, load_trl_rows
from workers.modelinfo import ModelNotFound, check_source
from workers.peftsetup import RunnerError, build_peft_config, quantization_config
from workers.reporter import Reporter
from workers.spec import TrainSpec
from workers.store import ArtifactStore, sha256_of, size_of

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FORWARDED_LOGGERS = ("transformers", "peft", "trl", "accelerate", "bitsandbytes")


class Cancelled(Exception):
    pass


@dataclass
class Device:
    kind: str  # "cuda" or "cpu"
    dtype_name: str  # "bfloat16", "float16" or "float32"


def pick_device(compute_dtype: str) -> Device:
    import torch

    if torch.cuda.is_available():
        if compute_dtype == "auto":
            compute_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return Device("cuda", compute_dtype)
    return Device("cpu", "float32" if compute_dtype == "auto" else compute_dtype)


class _ReporterLogHandler(logging.Handler):
    """Forward the ML libraries' warnings into the run's log."""

    def __init__(self, reporter: Reporter):
        super().__init__(level=logging.WARNING)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.log(f"{record.name}: {record.getMessage()}", level=record.levelname.lower())


def run_training(spec: TrainSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Run one attempt and report its outcome; returns the result on success."""
    handler = _ReporterLogHandler(reporter)
    for name in FORWARDED_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        reporter.started()
        result = _train(spec, reporter, store)
    except StaleAttempt:
        raise  # a newer attempt owns the run: report nothing more
    except Cancelled:
        reporter.log("Cancelled: training stopped at the user's request.", level="warning")
        reporter.finish("cancelled")
        return None
    except (RunnerError, DatasetError, ModelNotFound) as exc:
        reporter.log(f"Failed: {exc}", level="error")
        reporter.finish("failed", error=str(exc))
        return None
    except Exception as exc:
        reporter.log("".join(traceback.format_exception(exc)).rstrip(), level="error")
        reporter.finish("failed", error=f"{type(exc).__name__}: {exc}")
        return None
    finally:
        for name in FORWARDED_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
    reporter.finish("succeeded", result)
    return result


def _train(spec: TrainSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    started = time.monotonic()
    reporter.log(f"Attempt {spec.attempt} on {platform.node()}: loading the dataset")
    fmt, rows = load_trl_rows(store.path(spec.dataset.uri))
    reporter.log(f"Dataset: {len(rows)} rows, format {fmt}")

    device = pick_device(spec.lora.compute_dtype)
    tokenizer = _load_tokenizer(spec, rows, reporter)
    model = _load_model(spec, device, reporter)
    _check_cancel(reporter)

    from datasets import Dataset
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=_sft_config(spec, device, store),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=_peft_config(spec, model),
        callbacks=[ReporterCallback(reporter)],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to the reporter, not stdout
    trainable, total = trainer.model.get_nb_trainable_parameters()
    reporter.log(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    output = trainer.train()
    if reporter.cancel_requested:
        raise Cancelled()

    adapter_dir = store.path(spec.output_uri)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "adapter_uri": spec.output_uri,
        "size_bytes": size_of(adapter_dir),
        "sha256": sha256_of(adapter_dir),
        "trainable_params": trainable,
        "total_params": total,
        "final_loss": losses[-1] if losses else output.training_loss,
        "train_loss": output.training_loss,
        "steps": trainer.state.global_step,
        "runtime_s": round(time.monotonic() - started, 2),
        "device": device.kind,
        "dtype": device.dtype_name,
    }
    reporter.log(f"Adapter saved ({result['size_bytes']:,} bytes, sha256 {str(result['sha256'])[:12]}…)")
    return result


def _check_cancel(reporter: Reporter) -> None:
    reporter.flush()
    if reporter.cancel_requested:
        raise Cancelled()


def _load_tokenizer(spec: TrainSpec, rows: list[dict[str, Any]], reporter: Reporter) -> Any:
    from transformers import AutoTokenizer

    ref = spec.base_model
    check_source(ref.source)
    tokenizer = AutoTokenizer.from_pretrained(
        ref.source, revision=ref.revision or None, trust_remote_code=ref.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    conversational = "text" not in rows[0] and not isinstance(rows[0].get("prompt", []), str)
    if conversational and not tokenizer.chat_template:
        reporter.log("The tokenizer has no chat template: using a ChatML-style template.", level="warning")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def _load_model(spec: TrainSpec, device: Device, reporter: Reporter) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    ref, lora = spec.base_model, spec.lora
    dtype = getattr(torch, device.dtype_name)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": ref.trust_remote_code}
    if ref.revision:
        kwargs["revision"] = ref.revision
    if device.kind == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    quantization = quantization_config(lora, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    quant = f"4-bit {lora.quant_type.upper()}" if lora.quantization == "4bit" else "unquantized"
    reporter.log(f"Loading {ref.source} ({quant}, compute {device.dtype_name}) on {device.kind}")
    reporter.flush()
    model = AutoModelForCausalLM.from_pretrained(ref.source, **kwargs)
    if lora.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif spec.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if device.kind == "cuda":
        reporter.log(f"GPU memory after load: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    return model


def _peft_config(spec: TrainSpec, model: Any) -> Any:
    return build_peft_config(spec.lora, model)


def _sft_config(spec: TrainSpec, device: Device, store: ArtifactStore) -> Any:
    from trl import SFTConfig

    hp = spec.train
    scratch = store.path(spec.output_uri).parent / "trainer"
    return SFTConfig(
        output_dir=str(scratch),
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.num_epochs,
        max_steps=hp.max_steps if hp.max_steps > 0 else -1,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum,
        max_length=hp.max_seq_length,
        warmup_steps=hp.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=hp.lr_scheduler,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        logging_steps=hp.logging_steps,
        completion_only_loss=hp.completion_only_loss,
        gradient_checkpointing=False,  # enabled on the model above, where it belongs with k-bit prep
        bf16=device.kind == "cuda" and device.dtype_name == "bfloat16",
        fp16=device.kind == "cuda" and device.dtype_name == "float16",
        use_cpu=device.kind == "cpu",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class ReporterCallback(TrainerCallback):  # type: ignore[misc]
    """Streams progress to the reporter and stops training at the next step once cancelled."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._last_time = time.monotonic()
        self._last_tokens = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_time = time.monotonic()
        self.reporter.log(f"Training: {state.max_steps} steps, {args.num_train_epochs:g} epoch(s)")
        self.reporter.metric(step=0, total_steps=state.max_steps)
        self.reporter.flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.reporter.maybe_flush()
        if self.reporter.cancel_requested:
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.monotonic()
        tokens = float(logs.get("num_tokens", 0.0))
        elapsed = max(now - self._last_time, 1e-9)
        tokens_per_s = (tokens - self._last_tokens) / elapsed if tokens else None
        self._last_time, self._last_tokens = now, tokens
        point = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(float(logs.get("epoch", state.epoch or 0.0)), 4),
            "loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
            "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        }
        self.reporter.metric(**point)
        grad = f" grad_norm {point['grad_norm']:.3f}" if point["grad_norm"] is not None else ""
        speed = f" {point['tokens_per_s']:.0f} tok/s" if point["tokens_per_s"] else ""
        self.reporter.log(
            f"step {state.global_step}/{state.max_steps} epoch {point['epoch']:.2f} "
            f"loss {point['loss']:.4f} lr {point['learning_rate']:.2e}{grad}{speed}"
        )
        self.reporter.maybe_flush()
