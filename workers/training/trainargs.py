"""The TrainingArguments keywords every training objective shares: schedule, optimizer, checkpoints, evaluation,
and DDP or FSDP for a run over several GPUs. An objective adds its own and builds its trl config from them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from workers.contract.spec import TrainSpec
from workers.training.engine import Plan, sft_arguments
from workers.training.ranks import COLLECTIVE_TIMEOUT_S
from workers.training.tracking import run_name

# FSDP2 (fully_shard) by default; TUNEDECK_FSDP_VERSION=1 selects FSDP1 where a stack needs it.
FSDP_VERSION_ENV = "TUNEDECK_FSDP_VERSION"
OPTIMIZER_NAMES = {"adamw_8bit": "adamw_bnb_8bit"}


def training_arguments(spec: TrainSpec, plan: Plan, output_dir: Path, has_eval: bool) -> dict[str, Any]:
    """The keywords of the run's trl config that do not depend on its objective (the plan's included)."""
    hp = spec.train
    checkpoints = spec.checkpoint_uri and hp.save_steps > 0
    evaluation: dict[str, Any] = {}
    if has_eval:
        evaluation = {
            "eval_strategy": "steps" if hp.eval_steps else "epoch",
            "eval_steps": hp.eval_steps or None,
            "per_device_eval_batch_size": hp.batch_size,
        }
    return dict(
        output_dir=str(output_dir),
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.num_epochs,
        max_steps=hp.max_steps if hp.max_steps > 0 else -1,
        warmup_steps=hp.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=hp.lr_scheduler,
        optim=OPTIMIZER_NAMES.get(hp.optimizer, hp.optimizer),
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        data_seed=hp.seed,
        logging_steps=hp.logging_steps,
        neftune_noise_alpha=hp.neftune_noise_alpha or None,
        save_strategy="steps" if checkpoints else "no",
        save_steps=hp.save_steps or 500,
        save_total_limit=hp.keep_checkpoints,
        report_to=spec.train.trackers or "none",  # transformers' callbacks of the run's trackers (tracking.py)
        run_name=run_name(spec),
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_timeout=COLLECTIVE_TIMEOUT_S,
        **evaluation,
        **sft_arguments(plan, hp),
        **parallel_arguments(hp, plan),
    )


def one_gpu_per_process(config: Any, hp: Any) -> Any:
    """`config`, training on one GPU (the first visible) in a run of one process: never nn.DataParallel over the
    others. A worker narrows CUDA_VISIBLE_DEVICES to the GPUs of the attempt anyway; this covers a process that
    sees more."""
    if not hp.distributed and config.n_gpu > 1:
        config._n_gpu = 1
    return config


def parallel_arguments(hp: Any, plan: Plan) -> dict[str, Any]:
    """DDP or FSDP keywords for a multi-process run. Checkpoints hold full (un-sharded) state dicts so that
    a retry may resume on another number of processes."""
    if not hp.distributed:
        return {}
    if not hp.sharded:
        return {"ddp_find_unused_parameters": False}  # every adapter weight is used in every step
    version = int(os.environ.get(FSDP_VERSION_ENV, "2"))
    config: dict[str, Any] = {
        "version": version,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # decoder layers; PEFT's policy adds the adapter layers
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
        "activation_checkpointing": False,  # recomputation is set per layer by the plan
    }
    if version == 1:
        config.update(use_orig_params=False, sync_module_states=True, reshard_after_forward="full_shard")
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": config}
