"""A PEFT LoRA adapter's ``adapter_config.json``, checked, and PEFT's rule for its ``rank_pattern`` and
``alpha_pattern`` keys (`pattern_matches`: the one statement of it in tbdiag)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tbdiag.io.checkpoint import ADAPTER_CONFIG as CONFIG
from tbdiag.errors import CheckpointError



def read_config(folder: Path) -> dict:
    """``adapter_config.json``, checked to describe a plain LoRA adapter; ``rank_pattern``/``alpha_pattern``
    ({regular expression: positive number}) and ``modules_to_save`` (a list of module names) are ``{}`` and
    ``[]`` when absent.

    Raises:
        CheckpointError: an unreadable config, another adapter type, DoRA, or a value of the wrong kind.
    """
    where = folder / CONFIG
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a readable adapter config ({exc}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not an adapter config (a JSON object); re-save the adapter")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{where}: a {kind} adapter; only LoRA adapters are analysed")
    if config.get("use_dora"):
        raise CheckpointError(f"{where}: a DoRA adapter (its update is not s·B·A); merge it into the base model "
                              "(merge_and_unload) and analyse the merged model against the base instead")
    for key in ("r", "lora_alpha"):
        if not _positive(config.get(key)):
            raise CheckpointError(f"{where}: {key} is {config.get(key)!r}, not a positive number; re-save the adapter")
    saved = config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else saved
    if not isinstance(saved, list) or not all(isinstance(e, str) for e in saved):
        raise CheckpointError(f"{where}: modules_to_save is {saved!r}, not a list of module names; re-save the adapter")
    config = dict(config, rank_pattern=config.get("rank_pattern") or {},
                  alpha_pattern=config.get("alpha_pattern") or {}, modules_to_save=saved)
    for key in ("rank_pattern", "alpha_pattern"):
        if not _patterns(config[key]):
            raise CheckpointError(f"{where}: {key} is {config[key]!r}, not a map of regular expressions to positive "
                                  "numbers; re-save the adapter")
    return config


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _patterns(value: object) -> bool:
    """Whether ``value`` maps regular expressions to positive numbers."""
    if not isinstance(value, dict):
        return False
    try:
        return all(_positive(v) and re.compile(k) is not None for k, v in value.items())
    except (re.error, TypeError):
        return False


def pattern_matches(key: str, module: str) -> bool:
    """PEFT's rule for a ``rank_pattern``/``alpha_pattern`` key (a regular expression): the module name is the
    key, or ends with it after a dot."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """The value of the first pattern that matches the module name (`pattern_matches`), else ``default``."""
    return next((value for key, value in patterns.items() if pattern_matches(key, module)), default)
