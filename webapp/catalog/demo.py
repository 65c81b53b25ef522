"""First-start content for `tunedeck up`: a tiny model, a toy dataset, toy preference pairs and toy feedback, LoRA
presets, an admin."""

from __future__ import annotations

import json
import secrets
from typing import Any

from django.contrib.auth import get_user_model

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import register_base_model, register_dataset, store
from workers.config import env_str
from workers.training.demo import build_tiny_llama, feedback_rows, preference_rows, toy_rows

DEMO_MODEL = "demo-tiny-llama"
DEMO_DATASET = "demo-addition"
DEMO_PREFERENCES = "demo-even-digits"  # pairs for DPO and ORPO: answers in even digits preferred
DEMO_FEEDBACK = "demo-even-digits-feedback"  # feedback for KTO: answers in even digits labelled true, odd false
DEMO_CONFIG = "demo-lora-all-linear"
QLORA_CONFIG = "qlora-4bit-nf4"
# Adapter presets: LoraParams fields that differ from the defaults (targets resolve per architecture).
LORA_PRESETS: dict[str, dict[str, Any]] = {
    DEMO_CONFIG: {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]},
    "lora-attention-only": {"r": 16, "alpha": 32, "target_modules": ["attention"]},
    "lora-attention-mlp": {"r": 16, "alpha": 32, "target_modules": ["attention+mlp"]},
    QLORA_CONFIG: {
        "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"],
        "quantization": "4bit", "quant_type": "nf4", "double_quant": True,
    },
}


def ensure_demo_content() -> list[str]:
    """Create what is missing; return what was created (nothing on an initialised var/)."""
    created = []
    if not BaseModel.objects.filter(name=DEMO_MODEL).exists():
        path = store().path(f"store://models/{DEMO_MODEL}")
        build_tiny_llama(path)
        register_base_model(DEMO_MODEL, str(path))
        created.append(f"base model {DEMO_MODEL}")
    if not Dataset.objects.filter(name=DEMO_DATASET).exists():
        lines = "".join(f'{{"instruction": "{r["instruction"]}", "output": "{r["output"]}"}}\n' for r in toy_rows(512, 0))
        register_dataset(DEMO_DATASET, f"{DEMO_DATASET}.jsonl", lines.encode())
        created.append(f"dataset {DEMO_DATASET}")
    toy_sets = ((DEMO_PREFERENCES, preference_rows), (DEMO_FEEDBACK, feedback_rows))
    for name, rows in toy_sets:
        if not Dataset.objects.filter(name=name).exists():
            lines = "".join(json.dumps(row) + "\n" for row in rows(512, 0))
            register_dataset(name, f"{name}.jsonl", lines.encode())
            created.append(f"dataset {name}")
    for name, fields in LORA_PRESETS.items():
        if not LoraConfig.objects.filter(name=name).exists():
            LoraConfig.objects.create(name=name, params=fields)
            created.append(f"LoRA config {name}")
    return created


def ensure_admin() -> tuple[str, str] | None:
    """Create the first admin; return (username, password) when one was created, the password empty when it came
    from TUNEDECK_ADMIN_PASSWORD (whoever set it knows it: it is not printed)."""
    User = get_user_model()
    if User.objects.filter(is_superuser=True).exists():
        return None
    username = env_str("TUNEDECK_ADMIN_USER", "admin")
    given = env_str("TUNEDECK_ADMIN_PASSWORD")
    password = given or secrets.token_urlsafe(12)
    User.objects.create_superuser(username=username, password=password, email="")
    return username, "" if given else password
