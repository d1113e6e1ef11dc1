"""Shared plumbing of the benchmarks: paths, environment record, JSON files, the recipes, and a
small resumable work pool (single-threaded worker processes, results cached per unit)."""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
SETTINGS = ("quick", "full")
#: SPEC §8: WT2-offline lives next to the repository (``../shared/data/wikitext-2``).
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "wikitext-2"


@dataclass(frozen=True)
class Paths:
    """Where one setting's outputs go."""

    out: Path
    results: Path
    plots: Path
    report: Path
    cache: Path

    @staticmethod
    def for_setting(setting: str, out: str | Path | None = None) -> Paths:
        """``full``: the committed files (benchmarks/results, benchmarks/plots, BENCHMARKS.md).
        ``quick`` (or ``out`` given): everything under one folder, by default runs/bench-quick."""
        if out is None and setting == "full":
            return Paths(REPO, REPO / "benchmarks" / "results", REPO / "benchmarks" / "plots",
                         REPO / "BENCHMARKS.md", REPO / "runs" / "bench-cache" / "full")
        base = Path(out) if out is not None else REPO / "runs" / f"bench-{setting}"
        base = base if base.is_absolute() else (Path.cwd() / base)
        return Paths(base, base / "results", base / "plots", base / "BENCHMARKS.md", base / "cache")

    def result(self, name: str) -> Path:
        return self.results / f"{name}.json"


def resolve_data_dir(override: str | Path | None = None) -> Path:
    """WT2-offline: ``override``, ``$HF_RMSUON_WT2_DIR``, or ``<repo>/../shared/data/wikitext-2``."""
    path = Path(override or os.environ.get("HF_RMSUON_WT2_DIR") or DEFAULT_DATA_DIR)
    return path.resolve()


# --------------------------------------------------------------------------------------------------
# recipes (imported, not copied)
# --------------------------------------------------------------------------------------------------


def prepare_wt2_offline(data_dir: str | Path | None, preset: str) -> Path:
    """The WT2-offline directory (its files checked), with the BPE tokenizer of the wikitext2 recipe's
    ``preset`` trained and cached here once, so that the parallel workers only load it."""
    data = resolve_data_dir(data_dir)
    for f in ("wiki.valid.tokens", "wiki.test.tokens"):
        if not (data / f).is_file():
            raise SystemExit(f"WT2-offline data not found: {data / f} (pass --data_dir or set HF_RMSUON_WT2_DIR)")
    rc = load_recipe("_common")
    train_lines, _ = rc.hold_out(rc.read_text_file(data / "wiki.valid.tokens"), 5)
    rc.get_bpe_tokenizer(train_lines, load_recipe("wikitext2").PRESETS[preset].vocab_size)
    return data


def load_recipe(name: str):
    """``recipes/<name>.py`` as a module (the recipes import ``_common`` as a top-level module)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    return importlib.import_module(name)


# --------------------------------------------------------------------------------------------------
# environment record
# --------------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))


def at_edge(value: float, tried: Sequence[float]) -> int:
    """+1 if ``value`` is the largest of ``tried``, -1 if the smallest, else 0 (also with < 2 values):
    a best choice at an edge of what was tried may be beaten by a value beyond it."""
    if len(set(tried)) < 2:
        return 0
    return 1 if value == max(tried) else -1 if value == min(tried) else 0


def _command() -> str | None:
    if not sys.argv or not sys.argv[0]:
        return None
    path = Path(sys.argv[0])
    head = f"python -m benchmarks.{path.stem}" if path.parent.name == "benchmarks" else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded into every result file."""
    import torch
    import transformers

    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "hf_rmsuon", "recipes")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_rmsuon_git": _git("rev-parse", "--short=12", "HEAD"),
        "hf_rmsuon_dirty": bool(dirty),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.is_available(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": _command(),
    }


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def write_json(path: str | Path, payload: Any) -> None:
    """Atomic write (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# resumable work pool
# --------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One independent run: ``module.func(**kwargs)`` → a JSON-able dict."""

    key: str
    module: str
    func: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def cache_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in self.key)
        return f"{safe}-{stable_hash([self.module, self.func, self.kwargs])}.json"


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_unit(unit: Unit) -> tuple[str, dict[str, Any] | None, str | None, float]:
    start = time.perf_counter()
    try:
        module = importlib.import_module(unit.module)
        result = getattr(module, unit.func)(**unit.kwargs)
        return unit.key, result, None, time.perf_counter() - start
    except Exception:  # a failed unit is recorded, the others go on
        return unit.key, None, traceback.format_exc(), time.perf_counter() - start


def run_units(units: Sequence[Unit], cache_dir: Path, workers: int = 2, desc: str = "runs",
              resume: bool = True, threads: int = 1,
              on_update: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``units`` (in the order given) on ``workers`` single-threaded processes; ``{key: result}``
    (failures: ``{"error": traceback}``). Each finished unit is cached under ``cache_dir`` at once, and
    with ``resume`` a unit whose cache file exists (same function and arguments) is not run again.
    ``on_update(results so far)`` is called after every finished unit (to write partial results)."""
    from tqdm.auto import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    todo: list[Unit] = []
    for unit in units:
        path = cache_dir / unit.cache_name()
        if resume and path.is_file():
            cached = read_json(path)
            if "error" not in cached:
                results[unit.key] = cached
                continue
        todo.append(unit)
    if len(results):
        log(f"{desc}: {len(results)} of {len(units)} runs reused from the cache {cache_dir}")
    if not todo:
        return results
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=desc, dynamic_ncols=True, mininterval=5.0, file=sys.stdout)

    def record(key: str, result: dict | None, error: str | None, seconds: float) -> None:
        unit = next(u for u in todo if u.key == key)
        if error is not None:
            log(f"{desc}: {key} FAILED after {seconds:.0f}s:\n{error}")
            results[key] = {"error": error}
        else:
            result = {**result, "unit_seconds": seconds}
            write_json(cache_dir / unit.cache_name(), result)
            results[key] = result
            bar.write(f"[bench {time.strftime('%H:%M:%S')}] {desc}: {key} done in {seconds:.0f}s "
                      f"({_brief(result)})")
        bar.update(1)
        if on_update is not None:
            on_update(results)

    if workers <= 1 or len(todo) == 1:
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for unit in todo:
                record(*_run_unit(unit))
        finally:
            torch.set_num_threads(saved)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(threads,)) as pool:
            for out in pool.imap_unordered(_run_unit, todo):
                record(*out)
    bar.close()
    log(f"{desc}: {len(todo)} runs in {time.perf_counter() - start:.0f}s")
    return results


def _brief(result: dict[str, Any]) -> str:
    keys = ("summary",)
    for key in keys:
        if key in result:
            return str(result[key])
    return ", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float, str)))[:160]


def chunks(seq: Iterable[Any], n: int) -> list[list[Any]]:
    seq = list(seq)
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def run_main_guard(main: Callable[[list[str] | None], Any]) -> None:
    """Entry point helper: ``KeyboardInterrupt`` exits quietly (partial results are on disk)."""
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        log("interrupted; finished runs are cached and the result files written so far are kept")
        raise SystemExit(130) from None
