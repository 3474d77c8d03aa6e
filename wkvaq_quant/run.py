"""One evaluation run: validate the configuration, prepare data, load the model, measure, store."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .plan import FLAGS, QuantPlan
from .devices import check_device_map, parse_device_map, parse_max_memory
from .data import EVAL_DATASETS, check_datasets, get_calib_windows, get_eval_windows, resolve_text_source
from .eval.lm_eval import LMEvalSettings, check_chat_template, evaluate_tasks, load_task_manager
from .eval.ppl import evaluate_perplexity
from .eval.stream import StreamBatch, check_streamable, refuse_hub, stream_perplexity
from .layer_bits import layer_bits_table
from .modeling import attach
from .modeling.checkpoint import check_checkpoint, load_checkpoint_weights
from .arch import arch_for_config
from .config import FieldError
from .models import (DTYPES, ModelSource, _pretrained_path, check_model_available, load_model, load_tokenizer, model_config_dict,
                     model_depth, resolve_model)
from .plan_table import format_plan
from .results import (check_writable, clean_stale_tmp, environment_versions, now_iso, read_result, result_path,
                      write_result)
from .weights.algo import WeightAlgo, quantizes_weights, run_weight_algo
from .weights.registry import method_to_algo

__all__ = ["RunConfig", "run", "result_status", "show_plan", "ATTN_IMPLEMENTATIONS", "DEVICES"]

DEVICES = ("cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# fields that change the numbers; a result is keyed by these (plus the model)
_NUMERIC_FIELDS = ("dtype", "seq_len", "n_windows", "attn_implementation")


@dataclass
class RunConfig:
    """Everything `main.py` needs; validated on construction, before any loading."""

    model: str
    datasets: list[str] = field(default_factory=lambda: ["wiki_sample"])
    seq_len: int = 2048
    n_windows: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    data_dir: str | None = None
    results_dir: str = "results"
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    plan: QuantPlan = field(default_factory=QuantPlan)
    awq_model_path_lp: str | None = None  # weights of a fake-quantized checkpoint, loaded over the model's
    config_file: str | None = None  # the llmc-style YAML the plan was refined by (--config)
    weight_method: str = "RTN"  # weight algorithm (the YAML's quant.method); main.py runs RTN
    show_plan: bool = False  # print the resolved per-layer plan and stop (--show_plan)
    lm_eval: LMEvalSettings = field(default_factory=LMEvalSettings)  # --tasks ...: scores in the same file
    weight_algo: WeightAlgo = field(default_factory=WeightAlgo)  # --weight_algo and its settings
    layer_wise: bool = False  # write a quantized checkpoint block by block (--layer_wise) and stop
    save_quant: str | None = None  # where --layer_wise writes it
    offload_activations: bool = False  # --layer_wise: calibration activations in files under save_quant;
    # --stream_blocks: the windows' hidden states in files under the results directory (resumable)
    stream_blocks: bool = False  # evaluate with one decoder block in memory at a time (--stream_blocks)
    device_map: str | None = None  # a whole model across GPUs (--device_map: accelerate strategy or JSON)
    max_memory: str | None = None  # --max_memory with --device_map: "0=40GiB,1=40GiB,cpu=100GiB"

    def __post_init__(self) -> None:
        if not isinstance(self.plan, QuantPlan):
            raise ValueError(f"RunConfig.plan must be a QuantPlan, got {type(self.plan).__name__}")
        if isinstance(self.datasets, str):
            self.datasets = [d for d in self.datasets.split(",") if d]
        unknown = [d for d in self.datasets if d not in EVAL_DATASETS]
        if not isinstance(self.lm_eval, LMEvalSettings):
            raise ValueError(f"RunConfig.lm_eval must be LMEvalSettings, got {type(self.lm_eval).__name__}")
        if (not self.datasets and not self.lm_eval.tasks) or unknown:
            raise ValueError(f"--datasets: unknown or missing dataset(s) {unknown or self.datasets}; "
                             f"allowed values: {', '.join(EVAL_DATASETS)}")
        if self.seq_len <= 0:
            raise ValueError(f"--seq_len must be a positive number of tokens, got {self.seq_len}")
        if self.seq_len < 2:
            raise ValueError(f"--seq_len must be at least 2 (one token predicts the next), got {self.seq_len}")
        if self.n_windows is not None and self.n_windows <= 0:
            raise ValueError(f"--n_windows must be positive (or omitted for all windows), got {self.n_windows}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {self.batch_size}")
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}: allowed values are {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: allowed values are {', '.join(DTYPES)}")
        method_to_algo(self.weight_method)  # a registered algorithm's llmc method
        if not isinstance(self.weight_algo, WeightAlgo):
            raise ValueError(f"RunConfig.weight_algo must be a WeightAlgo, got {type(self.weight_algo).__name__}")
        if self.weight_algo.name != "rtn" and not quantizes_weights(self.plan):
            raise ValueError(f"--weight_algo {self.weight_algo.name} needs quantized weights; allowed: --w_bits below "
                             f"16 (or a --config weight setting), or --weight_algo rtn")
        if self.save_quant and not self.layer_wise:
            raise ValueError("--save_quant DIR is written by --layer_wise; allowed: --layer_wise --save_quant DIR")
        if self.offload_activations and not (self.layer_wise and self.weight_algo.needs_calib or self.stream_blocks):
            raise ValueError("--offload_activations keeps activations on disk: the calibration activations of a "
                             "--layer_wise run, or the windows' hidden states of a --stream_blocks evaluation; "
                             "allowed with: --layer_wise --weight_algo gptq (or awq), or --stream_blocks")
        if self.offload_activations and self.layer_wise:
            self.weight_algo.check_offload_activations()
        self._check_placement()
        self.weight_algo.check_plan(self.plan)
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"--attn_implementation {self.attn_implementation!r}: allowed values are "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)}")

    def _check_placement(self) -> None:
        """--stream_blocks and --device_map: what each combines with (their values are checked too)."""
        if self.stream_blocks:
            other = [flag for flag, on in (("--layer_wise", self.layer_wise), ("--tasks", bool(self.lm_eval.tasks)),
                                           ("--awq_model_path_lp", bool(self.awq_model_path_lp)),
                                           ("--device_map", self.device_map is not None)) if on]
            if other:
                raise ValueError(f"--stream_blocks evaluates perplexity block by block from the checkpoint's shards; "
                                 f"it does not combine with {', '.join(other)}; allowed: perplexity datasets with "
                                 f"quantization flags (a quantized checkpoint as --model DIR)")
            if self.weight_algo.name != "rtn":
                raise ValueError(f"--stream_blocks quantizes weights by RTN as blocks are read; for --weight_algo "
                                 f"{self.weight_algo.name} write the checkpoint first (--layer_wise --save_quant DIR "
                                 f"--weight_algo {self.weight_algo.name}), then --stream_blocks --model DIR")
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("--max_memory limits what --device_map places on each device; allowed: with --device_map")
        if self.device_map is not None:
            if self.layer_wise:
                raise ValueError("--device_map places a whole model across GPUs for evaluation; --layer_wise reads "
                                 "one block at a time on --device; allowed: one of the two")
            parse_device_map(self.device_map)
            if self.max_memory is not None:
                parse_max_memory(self.max_memory)

    def slug(self) -> str:
        """Result file name: readable settings plus a hash of every non-default numeric setting."""
        defaults = {f.name: f.default for f in fields(self)}
        numeric = {k: getattr(self, k) for k in _NUMERIC_FIELDS if getattr(self, k) != defaults[k]}
        if not self.plan.is_full_precision:  # FP runs keep their earlier slug
            numeric["plan"] = self.plan.to_dict()
        parts = [self.plan.slug(), self.dtype, f"seq{self.seq_len}"]
        if self.awq_model_path_lp:
            numeric["awq_model_path_lp"] = str(Path(self.awq_model_path_lp).resolve())
            parts.insert(0, "lp-" + Path(self.awq_model_path_lp).resolve().name)
        if self.weight_algo.name != "rtn":  # RTN runs keep their earlier slug
            numeric["weight_algo"] = self.weight_algo.to_dict(result_only=True)
            parts.insert(0, self.weight_algo.slug())
        if self.n_windows is not None:
            parts.append(f"nw{self.n_windows}")
        if self.attn_implementation != defaults["attn_implementation"]:
            parts.append(self.attn_implementation)
        digest = hashlib.sha256(json.dumps(numeric, sort_keys=True).encode()).hexdigest()[:8]
        return "-".join(parts) + f"-{digest}"

    def to_dict(self) -> dict:
        return {**asdict(self), "plan": self.plan.to_dict(), "weight_algo": self.weight_algo.to_dict()}


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu)")


def prepare_model(model: str, device: str, plan: QuantPlan, trust_remote_code: bool = False,
                  what: str = "--config", seq_len: int | None = None,
                  flags: dict[str, str] | None = None) -> tuple[ModelSource, int | None]:
    """The checks every entry point (evaluation, layer-wise writing, awq.entry) makes before any weight
    is read: the model resolves and is available, its family has an architecture entry, the device
    exists, a per-layer map fits the model's depth, and the plan's group sizes (and the residual,
    with the window length `seq_len`) fit the model's widths. Returns (source, depth; None without a
    map). `flags`: the entry point's own names of plan fields (plan.FLAGS by default)."""
    source = check_model_available(resolve_model(model))
    check_device(device)
    depth = None
    if plan.layers is not None:
        depth = model_depth(source, trust_remote_code)
        try:
            plan.layers.check_depth(depth)
        except ValueError as err:
            raise ValueError(f"{what} on --model {model}: {err}") from None
    if not plan.is_full_precision:
        config = model_config_dict(source)
        try:
            plan.check_dims(arch_for_config(config, f"--model {model}").dims(config), seq_len)
        except FieldError as err:
            raise err.for_flags({**FLAGS, **(flags or {})}) from None
    return source, depth


def check_attn_implementation(name: str, device: str) -> None:
    """flash_attention_2 needs the flash-attn package and CUDA: refused before the model loads."""
    if name != "flash_attention_2":
        return
    import importlib.util

    if device != "cuda" or importlib.util.find_spec("flash_attn") is None:
        raise ValueError("--attn_implementation flash_attention_2 needs --device cuda and the flash-attn package "
                         "(pip install -r requirements-gpu.txt); allowed here: sdpa, eager")


def show_plan(cfg: RunConfig) -> str:
    """`--show_plan`: the resolved W/A (and KV) settings of every block of the model, as a table."""
    source, depth = prepare_model(cfg.model, cfg.device, cfg.plan, cfg.trust_remote_code, f"--config {cfg.config_file}")
    depth = depth if depth is not None else model_depth(source, cfg.trust_remote_code)
    head = (f"plan {cfg.plan.slug()} on {source.name} ({depth} blocks), weight method {cfg.weight_method}"
            + (f", from {cfg.config_file}" if cfg.config_file else ""))
    return head + "\n" + format_plan(cfg.plan, depth)
def result_status(cfg: RunConfig) -> tuple[Path, bool]:
    """(result file, finished): finished when the file holds every requested dataset and task
    (never with --overwrite). Loads nothing; sweeps use it to skip finished settings."""
    path = result_path(cfg.results_dir, resolve_model(cfg.model).name, cfg.slug())
    record = read_result(path)
    wanted = {*cfg.datasets, *map(cfg.lm_eval.key, cfg.lm_eval.tasks)}
    have = set(record["results"]) | set(record.get("tasks", {})) if record else set()
    return path, not cfg.overwrite and record is not None and wanted <= have


def run(cfg: RunConfig, log=print) -> dict:
    """Evaluate `cfg`; returns the result record (also written to the results store).

    Order matters: names, devices and data are checked, and the evaluation windows built,
    before the model is loaded, so bad input fails in seconds.
    """
    started = time.perf_counter()
    if cfg.stream_blocks:
        refuse_hub(resolve_model(cfg.model))  # before asking the hub about it
    source, depth = prepare_model(cfg.model, cfg.device, cfg.plan, cfg.trust_remote_code, f"--config {cfg.config_file}",
                                  seq_len=cfg.seq_len if cfg.datasets else None)
    check_attn_implementation(cfg.attn_implementation, cfg.device)
    if cfg.device_map:
        check_device_map(parse_device_map(cfg.device_map), parse_max_memory(cfg.max_memory) if cfg.max_memory else None,
                         cfg.device, torch.cuda.device_count())
    if cfg.stream_blocks:
        check_streamable(source)
    if cfg.awq_model_path_lp:
        check_checkpoint(cfg.awq_model_path_lp)
    text_sources = check_datasets(cfg.datasets, cfg.data_dir) if cfg.datasets else {}
    algo = cfg.weight_algo
    calib_source = resolve_text_source(algo.calib.dataset, "calib", cfg.data_dir) if algo.needs_calib else None
    path = result_path(cfg.results_dir, source.name, cfg.slug())
    check_writable(path.parent)  # before any work: a finished evaluation must have somewhere to go
    clean_stale_tmp(path)
    record = None if cfg.overwrite else read_result(path)
    done = set(record["results"]) | set(record.get("tasks", {})) if record else set()
    todo = [d for d in cfg.datasets if d not in done]
    task_todo = [t for t in cfg.lm_eval.tasks if cfg.lm_eval.key(t) not in done]
    for d in [*cfg.datasets, *map(cfg.lm_eval.key, cfg.lm_eval.tasks)]:
        if d in done:
            log(f"[wkvaq] {d}: reusing {path} (pass --overwrite to recompute)")
    if source.note:
        log(f"[wkvaq] note: {source.note}")
    if not todo and not task_todo:
        return record

    task_manager = load_task_manager(task_todo) if task_todo else None  # names and datasets checked here
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    check_chat_template(tokenizer, cfg.lm_eval)
    windows: dict[str, torch.Tensor] = {}
    available: dict[str, int] = {}
    for name in todo:
        all_windows = get_eval_windows(text_sources[name], tokenizer, cfg.seq_len, source.add_special_tokens)
        available[name] = all_windows.shape[0]
        if available[name] == 0:
            raise ValueError(f"--seq_len {cfg.seq_len}: {name} has fewer than {cfg.seq_len} tokens, so no window")
        if cfg.n_windows is not None and cfg.n_windows > available[name]:
            raise ValueError(f"--n_windows {cfg.n_windows} is larger than the {available[name]} windows "
                             f"{name} has at --seq_len {cfg.seq_len}")
        windows[name] = all_windows[: cfg.n_windows] if cfg.n_windows else all_windows

    calib = None if calib_source is None else get_calib_windows(
        calib_source, tokenizer, algo.calib.n_samples, algo.calib.seq_len, algo.calib.seed, source.add_special_tokens)
    record = record or {
        "model": {"name": source.name, "kind": source.kind, "path": source.path,
                  "add_special_tokens": source.add_special_tokens, "note": source.note},
        "config": cfg.to_dict(),
        "slug": cfg.slug(),
        "results": {},
        "created": now_iso(),
    }
    if cfg.stream_blocks:
        evaluated, load_s, algo_s = _streamed(cfg, source, todo, windows, path, log), None, None
    else:
        model, load_s, algo_s = _loaded(cfg, source, algo, calib, log)
        evaluated = ((name, evaluate_perplexity(model, windows[name], cfg.batch_size, desc=name,
                                                progress=cfg.progress)) for name in todo)
    # any plan whose settings vary by layer (a map, or a plan class of its own): its table, recorded
    layer_bits = layer_bits_table(cfg.plan, depth if depth is not None else model_depth(source, cfg.trust_remote_code))
    if layer_bits:
        record["layer_bits"] = layer_bits
    for name, res in evaluated:
        record["results"][name] = {**res.to_dict(), "available_windows": available[name],
                                   "source": text_sources[name].describe()}
        if algo_s is not None:
            record["weight_algo_s"] = algo_s
        record.update(updated=now_iso(), model_load_s=load_s, versions=environment_versions(),
                      device=_device_name(cfg.device), peak_rss_mb=_peak_rss_mb())
        log(f"[wkvaq] {name}: ppl {res.ppl:.4f} over {res.windows} windows x {res.seq_len} tokens "
            f"({res.tokens_per_second:.0f} tok/s)")  # said before the write: a failed write loses nothing
        write_result(path, record)  # after every dataset: finished work is never lost
    if task_todo:
        scores, _ = evaluate_tasks(model, tokenizer, cfg.lm_eval, task_todo, task_manager, max_length=cfg.seq_len)
        record.setdefault("tasks", {}).update(scores)
        record.update(updated=now_iso(), model_load_s=load_s, versions=environment_versions(),
                      device=_device_name(cfg.device), peak_rss_mb=_peak_rss_mb())
        for key, entry in scores.items():
            log(f"[wkvaq] {key}: {entry['primary']} {entry['metrics'][entry['primary']]:.4f}")
        write_result(path, record)
    record["total_s"] = time.perf_counter() - started
    write_result(path, record)
    log(f"[wkvaq] wrote {path}")
    return record


def _loaded(cfg: RunConfig, source: ModelSource, algo: WeightAlgo, calib, log) -> tuple:
    """(the whole model with the plan attached, load seconds, weight-algorithm seconds or None)."""
    model, load_s = load_model(source, cfg.dtype, cfg.device, cfg.attn_implementation, cfg.trust_remote_code,
                               device_map=parse_device_map(cfg.device_map) if cfg.device_map else None,
                               max_memory=parse_max_memory(cfg.max_memory) if cfg.max_memory else None)
    placed = (f"across {sorted({str(d) for d in (getattr(model, 'hf_device_map', None) or {}).values()})} "
              f"(--device_map {cfg.device_map})" if cfg.device_map else f"on {cfg.device}")
    log(f"[wkvaq] loaded {source.path} ({source.kind}) in {load_s:.1f}s {placed} as {cfg.dtype}")
    if cfg.awq_model_path_lp:
        n = load_checkpoint_weights(model, cfg.awq_model_path_lp)
        log(f"[wkvaq] loaded {n} tensors from {cfg.awq_model_path_lp}")
    algo_s = None
    t0 = time.perf_counter()
    plan = run_weight_algo(model, cfg.plan, algo, calib, cfg.device, cfg.progress)  # RTN: nothing (attach rounds)
    if algo.slug():  # an algorithm with its own result name (not plain RTN): report its time
        algo_s = time.perf_counter() - t0
        log(f"[wkvaq] {algo.slug()}: weights quantized in {algo_s:.1f}s")
    if not plan.is_full_precision:
        attach(model, plan, keep_originals=False)
        log(f"[wkvaq] quantization: {cfg.plan.slug()} (attention: {model.config._attn_implementation})")
    return model, load_s, algo_s


def stream_dir(path: Path) -> Path:
    """Where `--stream_blocks --offload_activations` keeps the hidden states of the result file `path`."""
    return path.with_name(f".{path.stem}.stream")


def _streamed(cfg: RunConfig, source: ModelSource, todo: list[str], windows: dict[str, torch.Tensor], path: Path,
              log) -> list[tuple[str, object]]:
    """[(dataset, PerplexityResult)] of a block-streamed evaluation of every dataset in one pass."""
    batches = [StreamBatch(name, windows[name][b: b + cfg.batch_size])
               for name in todo for b in range(0, windows[name].shape[0], cfg.batch_size)]
    log(f"[wkvaq] streaming {source.path} block by block on {cfg.device} as {cfg.dtype}: {len(batches)} batches of "
        f"{', '.join(todo)}" + (" (hidden states offloaded to files)" if cfg.offload_activations else ""))
    results = stream_perplexity(
        _pretrained_path(source), cfg.plan, batches, {n: windows[n].shape[0] for n in todo}, DTYPES[cfg.dtype],
        cfg.device, cfg.attn_implementation, cfg.trust_remote_code, cfg.progress,
        offload_dir=stream_dir(path) if cfg.offload_activations else None,
        settings={"slug": cfg.slug(), "dtype": cfg.dtype, "device": cfg.device}, log=log)
    return [(name, results[name]) for name in todo]


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine()


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def format_table(record: dict) -> str:
    """A small Markdown table of a record's perplexities (and lm-eval scores)."""
    rows = ["| dataset | windows | seq_len | ppl |", "|---|---:|---:|---:|"] if record["results"] else []
    for name, r in record["results"].items():
        rows.append(f"| {name} | {r['windows']} | {r['seq_len']} | {r['ppl']:.4f} |")
    if record.get("tasks"):
        rows += [""] * bool(rows) + ["| task | metric | value | samples |", "|---|---|---:|---:|"]
        for key, t in record["tasks"].items():
            rows.append(f"| {key} | {t['primary']} | {t['metrics'][t['primary']]:.4f} | {t['n_samples']} |")
    return "\n".join(rows)

