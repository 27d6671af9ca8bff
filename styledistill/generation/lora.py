"""Loading LoRA files into a Qwen-Image pipeline's transformer, with a check that they really applied.

Key formats accepted and converted here, explicitly, to the diffusers/peft format:
- DiffSynth-Studio: `transformer_blocks.0.attn.to_q.lora_A.default.weight` (TeleStyle's released files);
- diffusers/peft: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (prefix optional);
- `lora_down`/`lora_up` names with an optional `diffusion_model.` prefix (as in Qwen-Image-Lightning files);
each optionally with `<module>.alpha`. Flattened kohya names (`lora_unet_...`) are refused.

`.alpha` follows the convention of the framework the file was made for (`loader`): diffusers/peft scale a
LoRA by alpha / rank; DiffSynth-Studio's `GeneralLoRALoader` (how TeleStyle V1 loaded both its LoRAs) fuses
`up @ down` at scale 1 and ignores alpha. The two agree only where alpha == rank; the effective scale is
logged and recorded.

diffusers and peft only log a warning when keys match no module (another prefix, another architecture),
and then the pipeline silently runs the base model. So after loading we count the LoRA layers peft created
for the adapter and compare them with the modules the file targets.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from styledistill.io.weights import sha256_files

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

LoraLoader = Literal["diffusers", "diffsynth"]

# Optional prefix, module path, the LoRA matrix, then DiffSynth's peft adapter segment `.default` if present.
_PREFIX = r"^(?:transformer\.|diffusion_model\.)?"
_WEIGHT_KEY = re.compile(_PREFIX + r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_ALPHA_KEY = re.compile(_PREFIX + r"(?P<module>.+)\.alpha$")
_KINDS = {"lora_A": "lora_A", "lora_down": "lora_A", "lora_B": "lora_B", "lora_up": "lora_B"}
FORMATS_HELP = (
    "expected DiffSynth keys like 'transformer_blocks.0.attn.to_q.lora_A.default.weight', diffusers keys like "
    "'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' or 'diffusion_model.<module>.lora_down.weight'"
)


class LoraLoadError(ValueError):
    """A LoRA file that cannot be read, converted or applied; the message names the file."""


@dataclass(frozen=True)
class LoraSpec:
    path: str
    name: str
    weight: float = 1.0
    loader: LoraLoader = "diffusers"  # whose `.alpha` convention applies


@dataclass(frozen=True)
class LoadedLora:
    name: str
    path: Path
    weight: float
    sha256: str
    target_modules: int  # distinct modules the file targets
    lora_layers: int  # LoRA layers peft created on the transformer for this adapter
    loader: LoraLoader = "diffusers"
    effective_scale: float = 1.0  # weight x alpha / rank (diffusers) or weight (diffsynth); the largest


def to_diffusers_lora(
    state_dict: dict[str, torch.Tensor], source: str, loader: LoraLoader = "diffusers"
) -> dict[str, torch.Tensor]:
    """Convert a LoRA state dict in any accepted format to diffusers keys (`transformer.<module>.lora_A.weight`).

    With `loader="diffusers"` an `.alpha` is folded into lora_A as alpha / rank, the scale diffusers applies
    at run time, so the adapter runs at scale 1 (diffusers' own conversion does the same); with
    `loader="diffsynth"` alpha is dropped, as DiffSynth-Studio's loader does.
    """
    converted, _ = _convert(state_dict, source, loader)
    return converted


def metadata_alpha_ratio(path: Path) -> float | None:
    """alpha / rank from the peft adapter config diffusers' `save_lora_weights` stores in the file's header
    (its files carry no `.alpha` keys); None when the file has none."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    config = {key.removeprefix("transformer."): value for key, value in json.loads(raw).items()}
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise LoraLoadError(f"LoRA {path}: per-module alpha_pattern / rank_pattern are not supported")
    alpha, rank = config.get("lora_alpha"), config.get("r")
    return alpha / rank if alpha and rank else None


def _convert(
    state_dict, source: str, loader: LoraLoader, default_ratio: float | None = None
) -> tuple[dict[str, torch.Tensor], set[float]]:
    """(diffusers state dict, the distinct alpha / rank ratios of the file's modules); `default_ratio`
    applies to modules without an `.alpha` key."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.startswith("lora_unet_"):  # flattened names are ambiguous (underscores inside module names)
            raise LoraLoadError(f"LoRA {source}: kohya-style key {key!r} is not supported; {FORMATS_HELP}")
        if match := _WEIGHT_KEY.match(key):
            kind = _KINDS[match["kind"]]
            if kind in parts.setdefault(match["module"], {}):
                raise LoraLoadError(f"LoRA {source}: {kind} of {match['module']!r} appears twice ({key!r})")
            parts[match["module"]][kind] = tensor
        elif match := _ALPHA_KEY.match(key):
            parts.setdefault(match["module"], {})["alpha"] = tensor
        else:
            raise LoraLoadError(f"LoRA {source}: unrecognised key {key!r}; {FORMATS_HELP}")
    if not parts:
        raise LoraLoadError(f"LoRA {source}: the file holds no tensors")

    converted, ratios = {}, set()
    for module, tensors in parts.items():
        if "lora_A" not in tensors or "lora_B" not in tensors:
            raise LoraLoadError(f"LoRA {source}: module {module!r} lacks lora_A or lora_B")
        down, up = tensors["lora_A"], tensors["lora_B"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoraLoadError(f"LoRA {source}: {module!r} has lora_A rank {rank} but lora_B {tuple(up.shape)}")
        ratio = tensors["alpha"].item() / rank if "alpha" in tensors else default_ratio
        if ratio is not None:
            ratios.add(ratio)
            if loader == "diffusers":
                down = (down.float() * ratio).to(down.dtype)
        converted[f"transformer.{module}.lora_A.weight"] = down
        converted[f"transformer.{module}.lora_B.weight"] = up
    return converted, ratios


def target_modules(diffusers_state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Module paths (relative to the transformer) that a converted state dict targets."""
    return {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in diffusers_state_dict}


def lora_layer_names(transformer: torch.nn.Module, adapter_name: str) -> set[str]:
    """Modules of the transformer that carry a LoRA layer for `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    return {
        name
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def _examples(names: set[str], limit: int = 3) -> str:
    shown = sorted(names)[:limit]
    return ", ".join(shown) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_lora(pipe, spec: LoraSpec, strict: bool = True) -> LoadedLora:
    """Load one LoRA file as adapter `spec.name` and verify the layers it created.

    `strict`: every module the file targets must exist in the transformer; otherwise at least one must.
    """
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    from safetensors.torch import load_file  # torch: only where a LoRA is loaded, not where options are checked

    try:
        raw = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise LoraLoadError(f"LoRA {path}: not a readable safetensors file ({err})") from err
    state_dict, ratios = _convert(raw, str(path), spec.loader, metadata_alpha_ratio(path))
    scale = spec.weight * (max(ratios, default=1.0) if spec.loader == "diffusers" else 1.0)
    if any(r != 1.0 for r in ratios):
        other = "diffsynth" if spec.loader == "diffusers" else "diffusers"
        logger.warning(
            "LoRA %s: alpha != rank (alpha/rank %s); loaded with the %s convention at effective scale %g "
            "(the %s convention would differ)", path, sorted(ratios), spec.loader, scale, other,
        )  # fmt: skip
    logger.info("LoRA %s as adapter %r: %s loader, effective scale %g", path, spec.name, spec.loader, scale)
    wanted = target_modules(state_dict)

    # Check names before loading: peft would only warn about missing ones, or fail with a generic error.
    existing = {name for name, _ in pipe.transformer.named_modules()}
    absent = wanted - existing
    if absent == wanted:
        raise LoraLoadError(
            f"LoRA {path}: none of its {len(wanted)} target modules exist in the transformer "
            f"(e.g. {_examples(absent)}); wrong base model or key format? {FORMATS_HELP}"
        )
    if absent and strict:
        raise LoraLoadError(
            f"LoRA {path}: {len(absent)} of its {len(wanted)} target modules do not exist in the transformer: "
            f"{_examples(absent)} (strict=False loads the rest)"
        )

    try:
        pipe.load_lora_weights(state_dict, adapter_name=spec.name)
    except (RuntimeError, ValueError) as err:  # e.g. shape mismatches against the base weights
        raise LoraLoadError(f"LoRA {path}: loading as adapter {spec.name!r} failed: {err}") from err

    created = lora_layer_names(pipe.transformer, spec.name)
    expected = wanted - absent
    if created != expected:
        raise LoraLoadError(
            f"LoRA {path}: expected {len(expected)} LoRA layers for adapter {spec.name!r}, peft created "
            f"{len(created & expected)} of them; missing: {_examples(expected - created) or 'none'}"
        )
    return LoadedLora(
        name=spec.name,
        path=path,
        weight=spec.weight,
        sha256=sha256_files([path]),
        target_modules=len(wanted),
        lora_layers=len(created),
        loader=spec.loader,
        effective_scale=scale,
    )


def load_loras(pipe, specs: list[LoraSpec], fuse: bool = False, strict: bool = True) -> list[LoadedLora]:
    """Load several LoRAs as named adapters, activate them with their weights, optionally fuse them.

    Fusing merges `weight * delta` into the base weights and then drops the LoRA layers: no per-step LoRA
    cost, but the adapters can no longer be switched.
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise LoraLoadError(f"LoRA adapter names must be unique, got {names}")
    loaded = [load_lora(pipe, spec, strict=strict) for spec in specs]
    if not loaded:
        return loaded
    pipe.set_adapters(names, adapter_weights=[spec.weight for spec in specs])
    if fuse:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
        pipe.unload_lora_weights()
    return loaded
