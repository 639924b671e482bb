"""A small stage runner for the main job: each stage is a subprocess with a stage record.

A :class:`Stage` names its commands (``python recipes/<x>.py --config ... --key value``), the
config files it reads, its inputs (files or folders of earlier stages) and the folder it writes
(``<run>/<stage>/`` by default). After every command of a stage exits 0, the runner writes
``<folder>/stage.json`` atomically: the commands, a hash of every config file's text and of the
command lines, a hash of every input (folder trees by relative path + size + mtime, so hashing a
multi-GB folder takes milliseconds), package versions and the git commit, wall time, the
stage's peak RSS (``os.wait4`` reports the child's, its waited-for descendants included) and
when it finished. Rules:

- a stage whose ``stage.json`` matches the current config and input hashes (and whose declared
  outputs exist) is **skipped**;
- ``only=`` reruns one stage (forced), ``start=`` reruns from a stage on, ``force=`` all;
  ``until=`` stops after a stage;
- an interrupted run (Ctrl-C, kill, a crash) leaves no ``stage.json`` for the stage it was in
  (the record is removed before the stage starts), so the next run resumes there; recipes that
  checkpoint (SFT, DPO, the DiT) also resume inside the stage;
- a failed stage blocks the stages that ``needs`` it; with ``keep_going`` the others still run,
  so the report shows every result that could be computed;
- a stage whose ``requires`` paths are missing (e.g. a recipe not installed) is *unavailable*:
  reported, not run, not an error.

``stage.log`` next to ``stage.json`` holds the stage's stdout and stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from scope.io import write_json

RECORD = "stage.json"
LOG = "stage.log"
STARTED = "stage.started.json"   # the fingerprint of a stage that started and has not finished
_OWN_FILES = (RECORD, LOG, STARTED)
VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "numpy", "uscope")


class PipelineError(RuntimeError):
    """A stage failed, was interrupted, or cannot run (named in the message)."""


@dataclass
class Stage:
    """One step of a pipeline: commands run in order in ``cwd``; ``folder`` holds its outputs."""

    name: str
    commands: list[list[str]]
    folder: str | Path
    configs: list[str | Path] = field(default_factory=list)   # files whose text is part of the stage's identity
    inputs: list[str | Path] = field(default_factory=list)    # files / folders whose content is an input
    outputs: list[str | Path] = field(default_factory=list)   # must exist after success (default: the folder)
    needs: list[str] = field(default_factory=list)            # earlier stages that must have succeeded
    requires: list[str | Path] = field(default_factory=list)  # missing -> stage unavailable (not an error)
    description: str = ""
    env: dict[str, str] = field(default_factory=dict)
    clean_on_rerun: bool = True   # a finished stage rerun (forced / stale) starts from an empty folder
    always: bool = False          # rerun on every pipeline run (cheap stages such as the report)
    nice: int = 0                 # scheduling niceness of its commands: > 0 yields the cores to stages at 0

    @property
    def record_path(self) -> Path:
        return Path(self.folder) / RECORD


@dataclass
class StageResult:
    name: str
    status: str            # done | skipped | failed | blocked | unavailable | interrupted
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    detail: str = ""
    cpu_s: float | None = None   # user + system CPU time of the stage's processes (load-independent work)


# --------------------------------------------------------------------------- hashing

def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hash_path(path: str | Path) -> str:
    """A fingerprint of a file or folder tree: relative path + size + mtime of every file.

    The runner's own ``stage.json`` / ``stage.log`` are left out, so re-recording a stage does not
    invalidate the stages that read its folder. A missing path hashes to ``"missing"``.
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name in _OWN_FILES and Path(root) == path:
                continue
            file = Path(root) / name
            try:
                st = file.stat()
            except FileNotFoundError:  # a dangling link or a file removed meanwhile
                continue
            h.update(f"{file.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def stage_fingerprint(stage: Stage) -> dict:
    """What a stage consumed: a hash of its command lines + config texts, and of every input."""
    configs = {str(c): hash_text(Path(c).read_text()) if Path(c).exists() else "missing" for c in stage.configs}
    command_text = "\n".join(shlex.join(c) for c in stage.commands)
    config_hash = hash_text(command_text + "\n" + json.dumps(configs, sort_keys=True))
    return {"config_hash": config_hash, "configs": configs,
            "inputs": {str(p): hash_path(p) for p in stage.inputs}}


# --------------------------------------------------------------------------- provenance

def package_versions(names: Sequence[str] = VERSIONED) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(cwd: str | Path = ".") -> str | None:
    """The checkout's commit (+ "-dirty" with uncommitted changes), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_record(stage: Stage) -> dict | None:
    return _read_json(stage.record_path)


def up_to_date(stage: Stage, record: dict | None = None) -> tuple[bool, str]:
    """Whether the stage's record matches what it would consume now, and why not."""
    record = read_record(stage) if record is None else record
    if record is None:
        return False, "no stage.json"
    if record.get("status") != "ok":
        return False, f"last status {record.get('status')}"
    now = stage_fingerprint(stage)
    if record.get("config_hash") != now["config_hash"]:
        return False, "config or command changed"
    changed = [p for p, h in now["inputs"].items() if record.get("inputs", {}).get(p) != h]
    if changed:
        return False, f"input changed: {', '.join(changed)}"
    missing = [str(p) for p in (stage.outputs or [stage.folder]) if not Path(p).exists()]
    if missing:
        return False, f"output missing: {', '.join(missing)}"
    return True, "up to date"


# --------------------------------------------------------------------------- running

_CHILDREN: set[subprocess.Popen] = set()   # the commands running now (several with ``jobs`` > 1)


def stop_running(timeout: float = 30) -> None:
    """Interrupt every running command (SIGINT, then SIGKILL after ``timeout`` s) and wait for it."""
    for proc in list(_CHILDREN):
        proc.send_signal(signal.SIGINT)
    for proc in list(_CHILDREN):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_command(command: list[str], log_file, cwd: Path, env: dict, echo: Callable[[str], None], nice: int = 0
                 ) -> tuple[int, float, float]:
    """Run one command, copying its output to the log and ``echo``; (exit status, peak RSS MB, CPU s)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)
    _CHILDREN.add(proc)

    def pump():
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            echo(line)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        stop_running()  # the terminal's Ctrl-C reached it too; make sure, then wait
        raise
    finally:
        _CHILDREN.discard(proc)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    return proc.returncode, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: KiB on Linux


def run_stage(stage: Stage, cwd: str | Path = ".", quiet: bool = False) -> StageResult:
    """Run every command of ``stage``; on success write its ``stage.json`` atomically.

    A stage that finished before (it has a record) and runs again starts from an empty folder
    (``clean_on_rerun``), so stale checkpoints of another configuration are never resumed; a stage
    that was interrupted keeps its folder, so recipes that checkpoint resume, unless its
    configuration or inputs changed since it started (then it starts afresh too).
    """
    folder = Path(stage.folder)
    fingerprint = stage_fingerprint(stage)
    if stage.clean_on_rerun and folder.is_dir():
        begun = _read_json(folder / STARTED)
        if stage.record_path.exists() or (begun is not None and begun != fingerprint):
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage.record_path.unlink(missing_ok=True)  # an interrupted stage must not look finished
    write_json(folder / STARTED, fingerprint)
    env = {**os.environ, **stage.env}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cwd).resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONUNBUFFERED", "1")
    started = datetime.now(timezone.utc)
    start, peak, cpu = time.perf_counter(), 0.0, 0.0

    def echo(line: str) -> None:
        if not quiet:
            sys.stdout.write(f"  [{stage.name}] {line}" + ("" if line.endswith("\n") else "\n"))
            sys.stdout.flush()
    with open(folder / LOG, "a", encoding="utf-8") as log_file:  # a resumed stage keeps the earlier attempt's log
        log_file.write(f"# stage {stage.name}, started {started.isoformat(timespec='seconds')}\n")
        for command in stage.commands:
            log_file.write(f"$ {shlex.join(command)}\n")
            log_file.flush()
            status, rss, seconds = _run_command(command, log_file, Path(cwd), env, echo, stage.nice)
            peak, cpu = max(peak, rss), cpu + seconds
            if status != 0:
                return StageResult(stage.name, "failed", time.perf_counter() - start, peak,
                                   f"exit {status} of `{shlex.join(command)}`; see {folder / LOG}", cpu)
    wall = time.perf_counter() - start
    missing = [str(p) for p in stage.outputs if not Path(p).exists()]
    if missing:
        return StageResult(stage.name, "failed", wall, peak, f"outputs missing after success: {', '.join(missing)}", cpu)
    (folder / STARTED).unlink(missing_ok=True)
    write_json(stage.record_path, {
        "stage": stage.name, "status": "ok", "description": stage.description,
        "commands": [shlex.join(c) for c in stage.commands], **fingerprint,
        "outputs": [str(p) for p in (stage.outputs or [stage.folder])],
        "versions": package_versions(), "git_commit": git_commit(cwd), "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak, 1),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return StageResult(stage.name, "done", wall, peak, cpu_s=cpu)


def select(stages: Sequence[Stage], only: str | None = None, start: str | None = None,
           until: str | None = None) -> tuple[set[str], set[str]]:
    """(stages to consider, stages forced to rerun) for ``only`` / ``start`` / ``until``."""
    names = [s.name for s in stages]
    for given in (only, start, until):
        if given is not None and given not in names:
            raise PipelineError(f"unknown stage {given!r}; stages: {', '.join(names)}")
    if only is not None:
        return {only}, {only}
    considered = names[:names.index(until) + 1] if until is not None else names
    forced = set(names[names.index(start):]) & set(considered) if start is not None else set()
    return set(considered), forced


def _dependencies(stages: Sequence[Stage]) -> dict[str, set[str]]:
    """Each stage's earlier stages it waits for: the ``needs``, and every stage whose folder holds one
    of its ``inputs`` (the report reads every folder, so it waits for all)."""
    deps = {}
    for i, stage in enumerate(stages):
        inputs = [Path(p).resolve() for p in stage.inputs]
        deps[stage.name] = set(stage.needs) | {
            other.name for other in stages[:i]
            if any(p == Path(other.folder).resolve() or Path(other.folder).resolve() in p.parents for p in inputs)}
    return deps


def run_pipeline(stages: Sequence[Stage], *, cwd: str | Path = ".", only: str | None = None,
                 start: str | None = None, until: str | None = None, force: bool = False, keep_going: bool = False,
                 quiet: bool = False, print_fn: Callable[[str], None] = print,
                 status_path: str | Path | None = None, jobs: int = 1,
                 on_done: Callable[[Stage], list[str]] | None = None) -> list[StageResult]:
    """Run ``stages`` (see the module docstring); returns one result per stage, in their order.

    ``jobs`` stages run at once: a stage starts, in list order, once every stage it waits for
    (:func:`_dependencies`) has finished, so ``jobs=1`` runs them one after the other. Raises
    :class:`PipelineError` at the first failure (after the running stages end) unless
    ``keep_going`` (then the summary lists it, and the caller decides the exit status); Ctrl-C
    stops every running stage after printing how to resume. ``status_path`` (e.g.
    ``<run>/pipeline.json``) gets every stage's latest status whenever a stage starts or ends, so
    a report stage can say why a result is missing. ``on_done(stage)`` returns warnings about a
    finished stage's results (its floors); they are printed and appended to its ``stage.log``.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise PipelineError(f"duplicate stage names in {names}")
    if jobs < 1:
        raise PipelineError(f"jobs must be >= 1, got {jobs}")
    considered, forced = select(stages, only, start, until)
    if force:
        forced = set(considered)
    deps = _dependencies(stages)
    tags = {s.name: f"[{i}/{len(stages)}] {s.name}" for i, s in enumerate(stages, 1)}
    results: dict[str, StageResult] = {}
    waiting = [s for s in stages if s.name in considered]
    running: dict[Future, Stage] = {}
    failed = False

    def status() -> None:
        if status_path is not None:
            write_status(status_path, stages, results)

    def settle(stage: Stage) -> str | None:
        """Decide a stage that need not run (skipped / unavailable / blocked): None; else why it runs."""
        tag = tags[stage.name]
        missing = [str(p) for p in stage.requires if not Path(p).exists()]
        blocked = [n for n in stage.needs if n in results and results[n].status not in ("done", "skipped")]
        record = read_record(stage)
        fresh, why = up_to_date(stage, record)
        if missing:
            results[stage.name] = StageResult(stage.name, "unavailable", detail=f"missing {', '.join(missing)}")
            print_fn(f"{tag}: not available ({results[stage.name].detail})")
        elif blocked:
            results[stage.name] = StageResult(stage.name, "blocked", detail=f"needs {', '.join(blocked)}")
            print_fn(f"{tag}: blocked (needs {', '.join(blocked)})")
        elif fresh and stage.name not in forced and not stage.always:
            results[stage.name] = StageResult(stage.name, "skipped", record.get("wall_s"), record.get("peak_rss_mb"),
                                              f"up to date (finished {record.get('finished_at')})", record.get("cpu_s"))
            print_fn(f"{tag}: skipped, up to date")
        else:
            return "forced" if stage.name in forced else "always rebuilt" if stage.always and fresh else why
        return None

    def finish(stage: Stage, result: StageResult) -> None:
        nonlocal failed
        results[stage.name] = result
        tag = tags[stage.name]
        if result.status == "done":
            print_fn(f"{tag}: done in {result.wall_s:.1f} s ({result.cpu_s:.0f} CPU s), "
                     f"peak RSS {result.peak_rss_mb:,.0f} MB")
            warnings = on_done(stage) if on_done is not None else []
            if warnings:
                with open(Path(stage.folder) / LOG, "a", encoding="utf-8") as log_file:
                    log_file.writelines(f"WARNING (result below its floor): {w}\n" for w in warnings)
                for w in warnings:
                    print_fn(f"{tag}: WARNING, result below its floor: {w}")
        else:
            print_fn(f"{tag}: FAILED ({result.detail})")
            failed = failed or not keep_going

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            while waiting or running:
                for stage in list(waiting):
                    if failed or len(running) >= jobs:
                        break
                    if any(d in considered and d not in results for d in deps[stage.name]):
                        continue   # an earlier stage it waits for has not finished
                    waiting.remove(stage)
                    reason = settle(stage)
                    if reason is None:
                        continue
                    print_fn(f"{tags[stage.name]}: running ({reason})"
                             f"{': ' + stage.description if stage.description else ''}")
                    running[pool.submit(run_stage, stage, cwd, quiet)] = stage
                    status()
                if failed and not running:
                    break
                if not running:
                    continue   # every remaining stage was settled above, or waits for one settled just now
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(running.pop(future), future.result())
                status()
        except KeyboardInterrupt:
            stop_running()
            for stage in running.values():
                results[stage.name] = StageResult(stage.name, "interrupted")
                print_fn(f"{tags[stage.name]}: interrupted; earlier stages are kept. Run the same command again "
                         "to resume here.")
            print_fn(summary_table(stages, results))
            raise
    status()
    print_fn(summary_table(stages, results))
    if failed:
        bad = next(r for r in results.values() if r.status == "failed")
        raise PipelineError(f"stage {bad.name} failed: {bad.detail}")
    return [results[n] for n in names if n in results]


def write_status(path: str | Path, stages: Sequence[Stage], results: dict[str, StageResult]) -> None:
    """Every stage's description, folder and latest status (this run's, else its record's)."""
    rows = []
    for stage in stages:
        r = results.get(stage.name)
        record = read_record(stage)
        status = r.status if r else ("recorded" if record else "not run")
        rows.append({"stage": stage.name, "description": stage.description, "folder": str(stage.folder),
                     "status": status, "detail": r.detail if r else "",
                     "wall_s": r.wall_s if r and r.wall_s is not None else (record or {}).get("wall_s"),
                     "peak_rss_mb": r.peak_rss_mb if r and r.peak_rss_mb is not None else (record or {}).get("peak_rss_mb"),
                     "cpu_s": r.cpu_s if r and r.cpu_s is not None else (record or {}).get("cpu_s"),
                     "commands": [shlex.join(c) for c in stage.commands]})
    write_json(path, {"updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": rows})


def summary_table(stages: Sequence[Stage], results: dict[str, StageResult]) -> str:
    """The final per-stage table: status, wall time (this run or the recorded one) and peak RSS."""
    lines = [f"{'stage':<16} {'status':<12} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12}  note", "-" * 80]
    total = 0.0
    for stage in stages:
        r = results.get(stage.name)
        if r is None:
            continue
        wall = "" if r.wall_s is None else f"{r.wall_s:8.1f}"
        rss = "" if r.peak_rss_mb is None else f"{r.peak_rss_mb:12,.0f}"
        cpu = "" if r.cpu_s is None else f"{r.cpu_s:8.0f}"
        total += (r.wall_s or 0.0) if r.status == "done" else 0.0
        lines.append(f"{stage.name:<16} {r.status:<12} {wall:>8} {cpu:>8} {rss:>12}  {r.detail if r.status != 'done' else ''}")
    lines.append(f"{'(ran now)':<16} {'':<12} {total:8.1f}")
    return "\n".join(lines)
