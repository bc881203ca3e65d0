"""Running EleutherAI's lm-evaluation-harness on qmoe sources, and on a compressed model's dense reference.

The harness (``pip install 'qmoe[lm-eval]'``) is imported only here and only when called, so ``import qmoe``
stays light. A model is loaded the way every qmoe command loads one (``qmoe.sources.load_model``: built-in
name, dense Hugging Face directory, or a compressed directory through ``qmoe.load``) and handed to the
harness's ``HFLM`` wrapper as a ready ``PreTrainedModel`` with its tokenizer, so the harness scores exactly
the model qmoe runs (encoded experts decoded inside the matmul), with no second loader and no hub access.

A compressed model is compared with its dense reference: the directory named by ``reference`` or, by
default, the ``source`` its ``qmoe_report.json`` records (``qmoe compress tiny-qwen3-moe OUT`` records the
built-in's name). The two run one after the other with the same options and seeds; ``compare`` checks that
they were given identical requests and pairs their per-item scores.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmoe.errors import ConfigError, DataError, QMoEError, SourceError

INSTALL_HINT = "pip install 'qmoe[lm-eval]'"
# simple_evaluate arguments that qmoe sets itself (the model, the tasks, what it needs to pair two runs).
RESERVED_OPTIONS = ("model", "model_args", "tasks", "task_manager", "log_samples", "batch_size", "device",
                    "evaluation_tracker", "predict_only")
# HFLM arguments that qmoe sets from the loaded model.
RESERVED_MODEL_ARGS = ("pretrained", "tokenizer", "backend", "batch_size", "device", "parallelize", "tp_plan")


class HarnessUnavailable(QMoEError):
    """lm-evaluation-harness is not installed."""


@dataclass(frozen=True)
class HarnessConfig:
    tasks: tuple[str, ...]
    batch_size: int = 32
    limit: float | None = None  # documents per task (an int), or a fraction of them if < 1
    include_path: tuple[str, ...] = ()  # folders of extra task YAMLs
    options: dict[str, Any] = field(default_factory=dict)  # further lm_eval.simple_evaluate arguments
    model_args: dict[str, Any] = field(default_factory=dict)  # further HFLM arguments

    def __post_init__(self) -> None:
        if not self.tasks or any(not t for t in self.tasks):
            raise ConfigError("--tasks needs at least one task name, e.g. --tasks hellaswag,arc_easy")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        whole = self.limit is not None and float(self.limit).is_integer()
        if self.limit is not None and not (self.limit > 0 and (self.limit < 1 or whole)):
            raise ConfigError(f"--limit must be a whole number of documents or a fraction in (0, 1), got "
                              f"{self.limit}")
        if self.limit is not None and "limit" in self.options:
            raise ConfigError("--limit and --lm-eval-args limit=... both given; pass one")
        for name, given, reserved in (("--lm-eval-args", self.options, RESERVED_OPTIONS),
                                      ("--model-args", self.model_args, RESERVED_MODEL_ARGS)):
            clash = sorted(set(given) & set(reserved))
            if clash:
                raise ConfigError(f"{name} cannot set {', '.join(clash)}: qmoe sets them (use --tasks, "
                                  "--batch-size, --device)")


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a one-line error saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - needs accelerate, part of the extra
    except ImportError as exc:
        raise HarnessUnavailable(f"lm-evaluation-harness is not installed ({exc.name} missing); "
                                 f"{INSTALL_HINT}") from exc
    return lm_eval


def parse_args_string(text: str | None, flag: str) -> dict[str, Any]:
    """``"num_fewshot=0,limit=100"`` as the harness's own command line parses it (numbers, booleans)."""
    if not text:
        return {}
    require_lm_eval()
    from lm_eval.utils import simple_parse_args_string

    bad = [part for part in text.split(",") if part and "=" not in part]
    if bad:
        raise ConfigError(f"{flag}: {bad[0]!r} is not KEY=VALUE; write e.g. {flag} num_fewshot=5,limit=100")
    return simple_parse_args_string(text)


def check_options(options: dict[str, Any]) -> None:
    """ConfigError for a key that ``lm_eval.simple_evaluate`` does not take (a typo would be ignored)."""
    import lm_eval

    known = set(inspect.signature(lm_eval.simple_evaluate).parameters) - set(RESERVED_OPTIONS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"--lm-eval-args: lm_eval.simple_evaluate has no option {', '.join(unknown)}; it "
                          f"takes {', '.join(sorted(known))}")


def reference_of(compressed_dir: Path) -> str:
    """The dense source a compressed directory was made from, as its qmoe_report.json records it."""
    from qmoe.sources import resolve_source

    report = compressed_dir / "qmoe_report.json"
    try:
        source = json.loads(report.read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{report} does not name the dense source ({type(exc).__name__}); pass "
                          "--reference DIR (the dense model) or --no-reference") from exc
    try:
        resolve_source(source)
    except SourceError as exc:
        raise SourceError(f"the dense source recorded in {report}, {source!r}, is not available here "
                          f"({exc}); pass --reference DIR (the dense model) or --no-reference") from exc
    return str(source)


def task_manager_for(config: HarnessConfig) -> Any:
    """The harness's TaskManager with ``config.include_path``; ConfigError for a task it does not know."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for folder in config.include_path:
        if not Path(folder).is_dir():
            raise ConfigError(f"--include-path {folder} is not a folder; pass a folder of task YAMLs")
    # Indexing the harness's own ~10,000 task YAMLs takes a while (minutes on a busy 2-core machine); tasks
    # that the include paths hold (qmoe_bible_next, your own) are found without it.
    if config.include_path:
        tm = TaskManager(include_path=list(config.include_path), include_defaults=False)
        if all(tm.match_tasks([t]) for t in config.tasks):
            return tm
    tm = TaskManager(include_path=list(config.include_path) or None)
    unknown = [t for t in config.tasks if not tm.match_tasks([t])]
    if unknown:
        raise ConfigError(f"lm-eval knows no task {', '.join(unknown)}; list them with `lm_eval ls tasks`, "
                          "or pass --include-path DIR for your own task YAMLs")
    return tm


def evaluate_model(model: Any, tokenizer: Any, config: HarnessConfig, task_manager: Any = None) -> dict:
    """The harness's results (``log_samples=True``) for a loaded model and tokenizer."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    check_options(config.options)
    tm = task_manager or task_manager_for(config)
    backend = "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend=backend, batch_size=config.batch_size,
              **config.model_args)
    options = dict(config.options)
    limit = None if config.limit is None else (config.limit if config.limit < 1 else int(config.limit))
    options["limit"] = options.get("limit", limit)  # --lm-eval-args limit=N works as --limit N
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(config.tasks), task_manager=tm,
                                          log_samples=True, **options)
    except OSError as exc:  # datasets/hub: a missing file, no network (requests' errors are OSErrors too)
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DataError(f"lm-eval could not read the data of {', '.join(config.tasks)} "
                        f"({type(exc).__name__}: {first}); tasks on the Hugging Face hub need it reachable: "
                        "offline, use qmoe_bible_next or your own task (--include-path)") from exc
    if results is None:  # only non-zero ranks of a distributed harness run get None
        raise QMoEError("lm-eval returned no results (a distributed launch?); run qmoe eval in one process")
    return results


def evaluate_source(source: str | Path, config: HarnessConfig, device: Any = "cpu",
                    backend: str | None = None, task_manager: Any = None, int8_weights: bool = False) -> dict:
    """Load ``source`` (built-in, dense or compressed directory) and score it; frees the model after."""
    from qmoe.sources import load_model

    model, tokenizer, _ = load_model(source, device=device, backend=backend, int8_weights=int8_weights)
    try:
        return evaluate_model(model, tokenizer, config, task_manager)
    finally:
        del model
        gc.collect()


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@dataclass(frozen=True)
class HarnessResult:
    source: str
    reference: str | None  # the dense model compared with, None when one model was scored
    compressed: bool  # whether ``source`` is a qmoe-compressed directory
    rows: tuple  # MetricRow per (task or group, metric, filter)
    requests: int  # requests checked identical in both runs (0 for one run)
    lm_eval_version: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "reference": self.reference, "compressed": self.compressed,
                "requests": self.requests, "lm_eval_version": self.lm_eval_version,
                "rows": [r.to_dict() for r in self.rows]}


def run_harness(source: str | Path, config: HarnessConfig, reference: str | Path | None = None,
                compare_reference: bool = True, device: Any = "cpu",
                backend: str | None = None, int8_weights: bool = False) -> HarnessResult:
    """Score ``source`` with the harness; a compressed source also its dense reference, paired.

    ``reference``: the dense model (default: the source recorded in the compressed directory's report);
    ``compare_reference=False`` scores a compressed source alone; ``int8_weights`` applies to the
    compressed model only (``qmoe.sources.load_model``). The task ``qmoe_bible_next``
    (``qmoe.harness.bible_task``) is written to a temporary folder and needs no ``include_path``.
    """
    import tempfile

    from qmoe.harness import bible_task
    from qmoe.harness.compare import check_identical_requests, compare, single_rows
    from qmoe.sources import is_compressed, read_config, resolve_source

    require_lm_eval()
    check_options(config.options)
    path = resolve_source(source)
    compressed = is_compressed(read_config(path))
    if reference is not None and not compressed:
        raise ConfigError(f"--reference compares a compressed model with its dense one, but {source} is not "
                          "compressed; pass the compressed directory as the source")
    if compressed and compare_reference:
        reference = str(reference) if reference is not None else reference_of(path)
    else:
        reference = None
    with tempfile.TemporaryDirectory(prefix="qmoe-lm-eval-") as tmp:
        if bible_task.TASK_NAME in config.tasks:
            bible_task.write_task(tmp)
            # first: a task of the same name in the user's own folders overrides qmoe's (later paths win)
            config = dataclasses.replace(config, include_path=(tmp, *config.include_path))
        tm = task_manager_for(config)  # unknown tasks fail here, before a model is loaded
        if reference is None:
            res = evaluate_source(path, config, device, backend, tm, int8_weights)
            rows = single_rows(res, "compressed" if compressed else "dense")
            return HarnessResult(str(source), None, compressed, tuple(rows), 0, harness_version())
        dense = evaluate_source(reference, config, device, backend, tm)
        other = evaluate_source(path, config, device, backend, tm, int8_weights)
    requests = check_identical_requests(dense, other)
    rows = tuple(compare(dense, other))
    return HarnessResult(str(source), reference, True, rows, requests, harness_version())
