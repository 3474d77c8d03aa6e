"""lm-eval tasks on the (quantized) model object, through lm-eval's Python API.

The model is wrapped as it is, hooks and fake-quantized weights included, in
`lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)` and evaluated with
`lm_eval.simple_evaluate`. Task YAMLs in `lm-evaluation-harness/` (offline tasks on the
embedded corpus) are found through `TaskManager(include_path=...)`; lm-eval's own tasks need
their datasets (hub or local cache).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import hub
from ..data import DataUnavailableError

__all__ = ["TASKS_DIR", "LMEvalSettings", "local_tasks", "load_task_manager", "check_chat_template",
           "evaluate_tasks"]

TASKS_DIR = Path(__file__).resolve().parents[2] / "lm-evaluation-harness"
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (perplexities); lm-eval's default 100000 is slow on CPU


@dataclass(frozen=True)
class LMEvalSettings:
    """--tasks, --num_fewshot, --limit, --apply_chat_template (and main.py's --batch_size)."""

    tasks: tuple[str, ...] = ()
    num_fewshot: int | None = None
    limit: float | None = None  # documents per task (>= 1) or a fraction of them (< 1)
    apply_chat_template: bool = False
    batch_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not all(isinstance(t, str) and t.strip() == t and t for t in self.tasks):
            raise ValueError(f"--tasks {self.tasks!r}: a comma-separated list of task names")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks {','.join(self.tasks)}: a task is named twice")
        if self.num_fewshot is not None and (isinstance(self.num_fewshot, bool) or self.num_fewshot < 0):
            raise ValueError(f"--num_fewshot {self.num_fewshot}: allowed values are integers >= 0")
        if self.limit is not None and (self.limit <= 0 or (self.limit >= 1 and self.limit != int(self.limit))):
            raise ValueError(f"--limit {self.limit}: allowed values are a document count >= 1 or a fraction in (0, 1)")
        if self.batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {self.batch_size}")

    def key(self, task: str) -> str:
        """Where a task's scores live in the result file: the task name plus every setting that
        changes them (`arc_easy`, `arc_easy[fewshot=5,limit=100,chat]`)."""
        parts = []
        if self.num_fewshot is not None:
            parts.append(f"fewshot={self.num_fewshot}")
        if self.limit is not None:
            parts.append(f"limit={self.limit:g}")
        if self.apply_chat_template:
            parts.append("chat")
        return task + (f"[{','.join(parts)}]" if parts else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def local_tasks(tasks_dir: Path = TASKS_DIR) -> list[str]:
    """Names of the task YAMLs shipped in `lm-evaluation-harness/`."""
    names = []
    for path in sorted(tasks_dir.glob("*.yaml")):
        m = re.search(r"^task:\s*(\S+)\s*$", path.read_text(encoding="utf-8"), re.MULTILINE)
        if m:
            names.append(m.group(1))
    return names


def load_task_manager(tasks: list[str] | tuple[str, ...]):
    """A TaskManager that knows `tasks`, with their datasets loadable; raises before any model is loaded.

    Unknown names raise ValueError; a hub task while the hub is unreachable (and offline mode is not
    requested), or whose dataset cannot be loaded, raises DataUnavailableError saying what it needs.
    """
    from lm_eval.tasks import TaskManager, get_task_dict

    local = set(local_tasks())
    hub_tasks = [t for t in tasks if t not in local]
    offline_hint = (f"The task needs its dataset from the Hugging Face hub: run once with network access (or copy "
                    f"the datasets cache into $HF_HOME) and then offline with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1; "
                    f"the offline tasks {', '.join(sorted(local))} need no download")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(hub_tasks))
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; allowed: the offline tasks "
                         f"{', '.join(sorted(local))} or any lm-eval task (python -m lm_eval ls tasks)")
    if hub_tasks and not hub.offline_requested() and not hub.hub_reachable():
        raise DataUnavailableError(f"--tasks {','.join(hub_tasks)}: the Hugging Face hub is not reachable. "
                                   f"{offline_hint} (set those variables to use a cached copy)")
    for task in tasks:
        try:
            get_task_dict([task], manager)
        except Exception as err:  # lm-eval and datasets raise many kinds on a missing dataset
            if task in local:
                raise
            raise DataUnavailableError(f"--tasks {task}: its dataset could not be loaded ({type(err).__name__}: "
                                       f"{err}). {offline_hint}") from err
    return manager


def check_chat_template(tokenizer, settings: LMEvalSettings) -> None:
    if settings.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--apply_chat_template: the model's tokenizer has no chat template; "
                         "allowed: an instruction-tuned model with one, or no --apply_chat_template")


def _metrics(entry: dict) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.1}."""
    out = {}
    for name, value in entry.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "sample_len":
            out[name.split(",")[0]] = float(value)
    return out


def _primary(task: str, metrics: dict[str, float], configs: dict) -> str:
    listed = [m["metric"] for m in configs.get(task, {}).get("metric_list", []) if isinstance(m.get("metric"), str)]
    for name in listed + [m for m in metrics if not m.endswith("_stderr")]:
        if name in metrics:
            return name
    raise ValueError(f"task {task}: lm-eval returned no numeric metric ({sorted(metrics)})")


def evaluate_tasks(model, tokenizer, settings: LMEvalSettings, tasks: list[str], manager, max_length: int,
                   log_samples: bool = False, samples: dict[str, list[int]] | None = None
                   ) -> tuple[dict[str, dict], dict]:
    """Run `tasks` on `model` as it is. Returns ({key: entry}, lm-eval's raw output), where an entry is
    {"task", "primary", "metrics", "n_samples", "settings"}; `key` is `settings.key(task)`.
    `max_length` is the window of rolling loglikelihoods (main.py passes --seq_len); `samples`
    ({task: [doc indices]}, instead of a limit) picks documents."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=max_length)
    limit = int(settings.limit) if settings.limit is not None and settings.limit >= 1 else settings.limit
    if samples is not None and limit is not None:
        raise ValueError("evaluate_tasks: give samples or --limit, not both")
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=settings.num_fewshot, limit=limit, samples=samples,
                          apply_chat_template=settings.apply_chat_template, task_manager=manager,
                          log_samples=log_samples, bootstrap_iters=BOOTSTRAP_ITERS)
    configs, n_samples = out.get("configs", {}), out.get("n-samples", {})
    scores = {}
    for task, entry in out["results"].items():
        metrics = _metrics(entry)
        if not metrics:
            continue
        effective = n_samples.get(task, {}).get("effective")
        scores[settings.key(task)] = {
            "task": task, "primary": _primary(task, metrics, configs), "metrics": metrics,
            "n_samples": effective, "settings": {k: v for k, v in settings.to_dict().items() if k != "tasks"},
        }
    return scores, out
