"""What a base model is, read from its config on the meta device: no weights are loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ModelNotFound(ValueError):
    pass


@dataclass
class ModelInfo:
    architecture: str = ""
    model_type: str = ""
    num_parameters: int = 0
    max_positions: int | None = None
    linear_modules: list[str] = field(default_factory=list)
    has_chat_template: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def check_source(source: str) -> None:
    """Refuse a local path that does not exist with a message that says so (not a hub 404)."""
    if looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise ModelNotFound(f"base model path {source!r} does not exist or is not a directory")


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can target (Conv1D too), the output head excluded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    }
    return sorted(names)


def inspect_model(source: str, revision: str = "", trust_remote_code: bool = False) -> ModelInfo:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_source(source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot read a model config from {source!r}: {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        has_template = bool(getattr(tokenizer, "chat_template", None))
    except (OSError, ValueError):
        has_template = False
    return ModelInfo(
        architecture=(config.architectures or [type(model).__name__])[0],
        model_type=config.model_type,
        num_parameters=sum(p.numel() for p in model.parameters()),
        max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
        linear_modules=linear_module_names(model),
        has_chat_template=has_template,
    )


def unknown_targets(targets: list[str], linear_modules: list[str]) -> list[str]:
    if targets == ["all-linear"]:
        return []
    return [t for t in targets if t not in linear_modules]
