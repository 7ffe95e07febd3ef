"""timm and Hugging Face image classifiers: ``timm:NAME``, ``hf:ORG/NAME`` and ``save_pretrained`` directories.

Nothing here touches the network. timm's pretrained weights and Hugging Face
models are read from the local Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``,
by default ~/.cache/huggingface/hub) or a directory; what is not there is a
one-line error that says how to get it. timm and transformers are imported only
here, when such a model is asked for: they are optional extras
(``pip install 'hookviz[timm]'``, ``'hookviz[hf]'``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError, did_you_mean
from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, default_preprocessing
from . import LoadedModel

# PIL's resampling filters by number, as Hugging Face image processors store them (``resample``).
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# The files timm's pretrained weights come in on the Hugging Face hub, in the order timm prefers them.
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: huggingface_hub's own setting (HF_HUB_CACHE, HF_HOME), else the default."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
        return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


# --- timm ------------------------------------------------------------------------------------------


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UsageError("timm: models need the timm package: pip install 'hookviz[timm]'") from None
    return timm


def load_timm(name: str, weights: str = "DEFAULT") -> LoadedModel:
    """``timm:NAME``: timm's model ``name`` (``resnet50.a1_in1k``: a pretrained tag after the dot).

    ``weights``: ``DEFAULT`` loads timm's pretrained weights from the local Hugging Face cache (never the network),
    ``none`` builds random weights. Preprocessing is timm's own data config; class names come from timm's
    ImageNet info when the weights were trained on an ImageNet subset.
    """
    timm = _import_timm()
    if weights.lower() not in ("default", "none"):
        raise UsageError(
            f"--weights {weights!r}: for timm models choose DEFAULT (timm's pretrained weights) or none (random); "
            f"pick another weight set by its tag: timm:{name.split('.')[0]}.TAG"
        )
    if not name or not timm.is_model(name):
        architectures = timm.list_models()
        hint = did_you_mean(name.split(".")[0], architectures)
        raise UsageError(f"unknown timm model {name!r}{hint or ''}; 'timm.list_models()' lists them")
    pretrained = weights.lower() == "default"
    try:
        if pretrained:
            state = _cached_timm_weights(timm, name)
            module = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
        else:
            module = timm.create_model(name, pretrained=False)
    except UsageError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"timm could not build {name} ({type(exc).__name__}: {first[:200]})") from None
    config = timm.data.resolve_data_config(model=module)
    preprocessing = timm_preprocessing(config)
    labels = timm_imagenet_labels(timm, module) if pretrained else None
    tag = module.pretrained_cfg.get("tag") or ""
    described = f"timm {module.pretrained_cfg.get('architecture', name)}" + (
        f" ({tag} pretrained weights)" if pretrained else " (random weights)"
    )
    loaded = LoadedModel(module, f"timm:{name}", described, preprocessing, labels)
    prefix = getattr(module, "num_prefix_tokens", None)
    if isinstance(prefix, int):
        loaded.prefix_tokens = prefix
    return loaded


def _cached_timm_weights(timm: Any, name: str) -> dict[str, torch.Tensor]:
    """The state_dict of timm model ``name``'s pretrained weights, read from the local cache (no download)."""
    from .files import read_safetensors

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        raise UsageError(f"timm model {name!r} has no pretrained weights; pass --weights none for random weights")
    cfg = cfg.to_dict()
    found = None
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(TIMM_WEIGHT_FILES)
        for filename in files:
            path = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision or None)
            if isinstance(path, str) and os.path.isfile(path):
                found = Path(path)
                break
    if found is None and cfg.get("url"):
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if candidate.is_file():
            found = candidate
    if found is None:
        where = hub_id or cfg.get("url") or name
        raise UsageError(
            f"timm:{name}: the pretrained weights ({where}) are not in the local cache ({hub_cache_dir()}); "
            f"download them once with network (python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), "
            "or pass --weights none for random weights"
        )
    if found.suffix == ".safetensors":
        return read_safetensors(found)
    try:
        state = torch.load(found, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(
            f"cannot read timm's cached weights {found} ({type(exc).__name__}); delete it and download again"
        ) from None
    from .files import unwrap_state_dict

    unwrapped = unwrap_state_dict(state)
    if unwrapped is None:
        raise UsageError(f"timm's cached weights {found} are not a state_dict; delete the file and download again")
    return unwrapped


def timm_preprocessing(config: dict[str, Any]) -> Preprocessing:
    """A ``Preprocessing`` from timm's ``resolve_data_config``: input size, mean, std, interpolation, and the resize
    before a center crop as timm computes it (``floor(size / crop_pct)``)."""
    _, height, width = config["input_size"]
    crop_pct = float(config.get("crop_pct") or 1.0)
    mean = tuple(float(v) for v in config.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in config.get("std", IMAGENET_STD))
    interpolation = str(config.get("interpolation") or "bilinear")
    return Preprocessing(
        input_size=(int(height), int(width)),
        resize_size=int(math.floor(min(height, width) / crop_pct)),
        mean=mean,
        std=std,
        interpolation=interpolation if interpolation != "random" else "bilinear",
    )


def timm_imagenet_labels(timm: Any, module: Any) -> list[str] | None:
    """Class names from timm's ImageNet info (the first name of each class's description, as torchvision
    names them: ``tench``, ``goldfish``), when the model's head is an ImageNet subset's; else None."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(module)
        if not subset:
            return None
        descriptions = ImageNetInfo(subset).label_descriptions()
    except Exception:  # no ImageNet info in this timm version, or a subset it does not describe
        return None
    if len(descriptions) != getattr(module, "num_classes", len(descriptions)):
        return None
    return [description.split(",")[0].strip() for description in descriptions]


# --- Hugging Face transformers ---------------------------------------------------------------------


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError("Hugging Face models need the transformers package: pip install 'hookviz[hf]'") from None
    return transformers


def load_hf(source: str, weights: str = "DEFAULT", *, local: bool) -> LoadedModel:
    """A Hugging Face image classifier: a ``save_pretrained`` directory (``local``) or a hub id in the local cache.

    Loaded offline (``local_files_only``) with ``AutoModelForImageClassification``; its image processor gives
    size, mean and std; ``config.id2label`` the class names; the model's ``.logits`` are the scores.
    ``weights``: ``DEFAULT`` (the saved weights) or ``none`` (random weights from the config).
    """
    transformers = _import_transformers()
    if weights.lower() not in ("default", "none"):
        raise UsageError(f"--weights {weights!r}: for Hugging Face models choose DEFAULT (the saved weights) or none")
    shown = source if local else f"hf:{source}"
    if not local and not source:
        raise UsageError("hf: needs a model id, e.g. hf:google/vit-base-patch16-224")
    where = {"local_files_only": True} if local else {"local_files_only": True, "cache_dir": str(hub_cache_dir())}
    with _quiet(transformers):
        return _load_hf(transformers, source, shown, weights, local, where)


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars ("Loading weights: 100%") and no warnings from transformers while a model loads."""
    logging = transformers.utils.logging
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _load_hf(
    transformers: Any, source: str, shown: str, weights: str, local: bool, where: dict[str, Any]
) -> LoadedModel:
    missing = (
        f"{shown} is not in the local Hugging Face cache ({hub_cache_dir()}); download it once with network "
        f"(hf download {source}), or pass a directory saved with save_pretrained"
    )
    try:
        config = transformers.AutoConfig.from_pretrained(source, **where)
    except OSError as exc:
        if not local:
            raise UsageError(missing) from None
        raise UsageError(f"cannot read {source}/config.json as a Hugging Face config ({_first_line(exc)})") from None
    except (ValueError, KeyError) as exc:
        raise UsageError(
            f"{shown}: unsupported Hugging Face config ({_first_line(exc)}); upgrade transformers"
        ) from None
    auto = transformers.AutoModelForImageClassification
    try:
        if weights.lower() == "none":
            module = auto.from_config(config)
        else:
            module = auto.from_pretrained(source, **where)
    except ValueError as exc:
        kind = getattr(config, "model_type", "?")
        raise UsageError(
            f"{shown} is not an image classifier transformers can load (model_type {kind!r}: {_first_line(exc)[:160]})"
        ) from None
    except OSError as exc:
        if not local:
            raise UsageError(missing) from None
        raise UsageError(f"cannot load the weights in {source} ({_first_line(exc)[:200]})") from None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, **where)
    except Exception:  # no preprocessor_config.json: the config's image size and ImageNet statistics
        processor = None
    preprocessing = hf_preprocessing(processor, config)
    names = getattr(config, "architectures", None) or [type(module).__name__]
    how = "random weights" if weights.lower() == "none" else "saved weights"
    loaded = LoadedModel(
        module, shown, f"Hugging Face {names[0]} from {shown} ({how})", preprocessing, hf_labels(config)
    )
    loaded.prefix_tokens = hf_prefix_tokens(config)
    return loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pair(value: Any) -> tuple[int, int] | None:
    """(height, width) from an int, a pair, or a size dict {"height", "width"} / {"shortest_edge"}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    fields = (
        value if isinstance(value, dict) else {k: getattr(value, k, None) for k in ("height", "width", "shortest_edge")}
    )
    height, width, shortest = fields.get("height"), fields.get("width"), fields.get("shortest_edge")
    if height and width:
        return int(height), int(width)
    if shortest:
        return int(shortest), int(shortest)
    return None


def hf_preprocessing(processor: Any, config: Any) -> Preprocessing:
    """A ``Preprocessing`` from a Hugging Face image processor: its size (or crop size), mean, std and resample.

    ``size`` {"height", "width"} is the input; {"shortest_edge"} with ``crop_pct`` (ConvNeXt) resizes the shorter
    side to ``shortest_edge / crop_pct`` before the crop; processors that center crop give ``crop_size``. Without a
    processor: the config's ``image_size`` and ImageNet's statistics.
    """
    if processor is None:
        side = _pair(getattr(config, "image_size", None)) or (224, 224)
        return default_preprocessing(side)
    size = _pair(getattr(processor, "size", None)) or _pair(getattr(config, "image_size", None)) or (224, 224)
    crop = _pair(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    crop_pct = getattr(processor, "crop_pct", None)
    if crop is not None:
        input_size, resize = crop, min(size)
    elif crop_pct and size[0] == size[1] and size[0] < 384:  # ConvNeXt: resize to size / crop_pct, crop to size
        input_size, resize = size, int(size[0] / crop_pct)
    else:
        input_size, resize = size, min(size)
    mean = tuple(float(v) for v in _per_channel(getattr(processor, "image_mean", None), IMAGENET_MEAN))
    std = tuple(float(v) for v in _per_channel(getattr(processor, "image_std", None), IMAGENET_STD))
    if getattr(processor, "do_normalize", True) is False:
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    # hookviz feeds pixels / 255; a processor that rescales by another factor (or not at all) expects other values.
    rescale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
    scale = 255 * rescale
    if not math.isclose(scale, 1.0, rel_tol=1e-6):
        mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)
    resample = getattr(processor, "resample", None)
    interpolation = PIL_RESAMPLE_NAMES.get(int(resample), "bilinear") if isinstance(resample, int) else "bilinear"
    return Preprocessing(input_size=input_size, resize_size=resize, mean=mean, std=std, interpolation=interpolation)


def _per_channel(values: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    if values is None:
        return default
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    return tuple(float(v) for v in values)


def hf_labels(config: Any) -> list[str] | None:
    """``config.id2label`` ordered by index; None for transformers' placeholders (LABEL_0, LABEL_1, ...)."""
    mapping = getattr(config, "id2label", None) or {}
    try:
        ordered = [str(name) for _, name in sorted((int(key), value) for key, value in mapping.items())]
    except (TypeError, ValueError):
        return None
    if not ordered or ordered == [f"LABEL_{i}" for i in range(len(ordered))]:
        return None
    return ordered


def hf_prefix_tokens(config: Any) -> int | None:
    """Tokens before the patch grid of a Hugging Face vision transformer: the class token, DeiT's distillation
    token, DINOv2's registers; None for a model without patch tokens (a CNN)."""
    if getattr(config, "patch_size", None) is None or getattr(config, "hidden_sizes", None) is not None:
        return None
    kind = str(getattr(config, "model_type", ""))
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0) + (1 if kind == "deit" else 0)
