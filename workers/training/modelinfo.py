"""What a base model is, read from its config on the meta device: no weights are loaded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.contract.spec import LoraParams, TrainParams


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
    family: str = ""  # architecture family whose module names the target presets use ("" when unknown)
    target_presets: dict[str, list[str]] = field(default_factory=dict)  # preset -> module names it adapts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def looks_like_path(source: str) -> bool:
    """Told by the text alone: whether some folder exists must not make a hub id a path (or tell it exists)."""
    return source.startswith(("/", "./", "../", "~"))


def local_model_folder(source: str, roots: Sequence[Path]) -> Path:
    """The folder a local source names, `~`, `..` and symlinks followed, if it is a folder under one of `roots`.

    A folder outside the roots and one that does not exist get the same answer, which says where local models
    may live: a refusal tells nothing about the filesystem outside the roots.
    """
    try:
        folder: Path | None = Path(source).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # an unknown ~user, a symlink loop, a NUL byte
        folder = None
    if folder is not None and any(folder.is_relative_to(root.resolve()) for root in roots) and folder.is_dir():
        return folder
    where = ", ".join(str(root) for root in roots)
    raise ModelNotFound(f"{source!r} is not a folder this server reads models from: local base models must be "
                        f"folders under {where} (TUNEDECK_MODEL_ROOTS)")


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
        family=getattr(family_of(config.model_type, linear_module_names(model)), "name", ""),
        target_presets=preset_table(linear_module_names(model), config.model_type),
    )


def unknown_targets(targets: list[str], linear_modules: list[str]) -> list[str]:
    """Explicit targets whose last name part is no linear module of the model (presets are not names)."""
    from workers.contract.spec import TARGET_PRESETS

    if len(targets) == 1 and targets[0] in TARGET_PRESETS:
        return []
    return [t for t in targets if t.rsplit(".", 1)[-1] not in linear_modules]


# --- architecture families and target presets -----------------------------------------------


@dataclass(frozen=True)
class Family:
    """Module names of one architecture family; a dotted name matches as a suffix (attn.c_proj), as in PEFT."""

    name: str
    model_types: tuple[str, ...]
    attention: tuple[str, ...]
    mlp: tuple[str, ...]

    def present(self, names: tuple[str, ...], linear_modules: list[str]) -> list[str]:
        return [n for n in names if n.rsplit(".", 1)[-1] in linear_modules]


FAMILIES = (
    Family(
        "llama",
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
         "olmo", "olmo2", "granite", "smollm3"),
        attention=("q_proj", "k_proj", "v_proj", "o_proj"),
        mlp=("gate_proj", "up_proj", "down_proj"),
    ),
    # GPT-2's Conv1D layers: c_proj is both the attention output and the MLP output, told apart by the parent.
    Family("gpt2", ("gpt2",), attention=("attn.c_attn", "attn.c_proj"), mlp=("mlp.c_fc", "mlp.c_proj")),
    Family(
        "bloom",
        ("bloom", "falcon", "gpt_neox"),
        attention=("query_key_value", "dense"),
        mlp=("dense_h_to_4h", "dense_4h_to_h"),
    ),
)


def family_of(model_type: str, linear_modules: list[str]) -> Family | None:
    """The family by model_type, else the first whose attention projections are all among the modules."""
    for family in FAMILIES:
        if model_type in family.model_types and family.present(family.attention, linear_modules):
            return family
    for family in FAMILIES:
        if len(family.present(family.attention, linear_modules)) == len(family.attention):
            return family
    return None


class TargetError(ValueError):
    pass


def resolve_targets(targets: list[str], linear_modules: list[str], model_type: str = "", model_name: str = "") -> list[str]:
    """Explicit module names for a target list or preset, checked against the model's linear modules."""
    from workers.contract.spec import TARGET_PRESETS

    listing = f"the linear modules of {model_name or 'this model'} are: {', '.join(linear_modules)}"
    preset = targets[0] if len(targets) == 1 and targets[0] in TARGET_PRESETS else None
    if preset == "all-linear":
        return list(linear_modules)
    if preset is None:
        unknown = unknown_targets(targets, linear_modules)
        if unknown:
            raise TargetError(f"{', '.join(unknown)} not found; {listing}")
        return list(targets)
    family = family_of(model_type, linear_modules)
    if family is None:
        raise TargetError(
            f"the {preset} preset needs a known architecture (Llama-like, GPT-2, BLOOM/Falcon); "
            f"list the modules instead: {listing}"
        )
    attention = family.present(family.attention, linear_modules)
    if preset == "attention":
        return attention
    mlp = family.present(family.mlp, linear_modules)
    if len(mlp) != len(family.mlp):
        raise TargetError(f"this model's MLP layers are not all linear modules ({family.name} family); {listing}")
    return attention + mlp


def preset_table(linear_modules: list[str], model_type: str = "") -> dict[str, list[str]]:
    """What each target preset adapts on this model (presets that do not apply are left out)."""
    from workers.contract.spec import TARGET_PRESETS

    table = {}
    for preset in TARGET_PRESETS:
        try:
            table[preset] = resolve_targets([preset], linear_modules, model_type)
        except TargetError:
            continue
    return table


def feedforward_targets(lora: LoraParams, targets: list[str], linear_modules: list[str], model_type: str = "") -> list[str]:
    """IA3's feed-forward modules: the ones given, else the targets that are the family's MLP layers.

    A bare name that is both attention and MLP (GPT-2's c_proj under all-linear) is left out: it scales outputs.
    """
    if lora.feedforward_modules:
        return list(lora.feedforward_modules)
    family = family_of(model_type, linear_modules)
    if family is None:
        return []
    mlp_only = {n.rsplit(".", 1)[-1] for n in family.mlp} - {n.rsplit(".", 1)[-1] for n in family.attention}
    return [t for t in targets if t in family.mlp or t in mlp_only]


def check_adapter(
    lora: LoraParams,
    linear_modules: list[str],
    model_type: str = "",
    *,
    train: TrainParams | None = None,
    max_positions: int | None = None,
    model_name: str = "",
) -> dict[str, str]:
    """All field-named errors of an adapter on a model: the adapter's own checks plus those that need the
    model's linear module names (as stored for a base model), so the control plane can refuse a run before
    queueing it and the runner refuses the same things."""
    errors = lora.validate(train)
    if lora.method in ("lora", "ia3") and "target_modules" not in errors:
        try:
            targets = resolve_targets(lora.target_modules, linear_modules, model_type, model_name)
        except TargetError as exc:
            errors["target_modules"] = str(exc)
        else:
            if lora.method == "ia3" and "feedforward_modules" not in errors:
                message = _feedforward_error(lora, targets)
                if message:
                    errors["feedforward_modules"] = message
    if lora.method in ("prefix_tuning", "prompt_tuning") and train is not None and max_positions:
        if train.max_seq_length + lora.num_virtual_tokens > max_positions:
            errors["num_virtual_tokens"] = (
                f"max_seq_length {train.max_seq_length} + {lora.num_virtual_tokens} virtual tokens exceeds the "
                f"model's {max_positions} positions"
            )
    return errors


def _feedforward_error(lora: LoraParams, targets: list[str]) -> str:
    outside = [m for m in lora.feedforward_modules if m not in targets]
    if outside:
        return f"{', '.join(outside)} not among the targets ({', '.join(targets)}): feed-forward modules must be targets too"
    return ""
