"""The teacher offline: every user's profile request as OpenAI Batch JSONL, the batch's answers into
the teacher cache (U-SCOPE section 5.1: the teacher's CoT + profile ``y_u`` of every user, for
cohorts too large to profile over a live endpoint).

    python recipes/teacher.py export --teacher_model Qwen/Qwen2.5-72B-Instruct   # CPU default: recipes/configs/teacher.yaml
    vllm run-batch -i runs/uscope/teacher_batch/requests.jsonl -o runs/uscope/teacher_batch/results.jsonl \
        --model Qwen/Qwen2.5-72B-Instruct                                          # or any OpenAI-format batch API
    python recipes/teacher.py import --teacher_model Qwen/Qwen2.5-72B-Instruct
    accelerate launch recipes/sft.py --teacher endpoint --teacher_model Qwen/Qwen2.5-72B-Instruct   # all cached: no request

``export`` renders each user's prompt exactly as :func:`scope.profiles.corpus.build_corpus` does
(same data keys: cohort, location clusters, synthetic users) and writes one request line per
prompt, streamed: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``, the
body being what :class:`~scope.profiles.teachers.EndpointTeacher` would POST (``max_tokens`` =
``teacher_max_new_tokens``, temperature 0, the profile schema as a strict ``json_schema``
``response_format``). Users already in the cache are skipped; users with identical prompts share
one request. OpenAI's Batch API takes at most 50,000 lines per file: cut the file with
``split -l 50000 --additional-suffix=.jsonl requests.jsonl part-`` and list the parts' results in
``results_files``.

``import`` reads batch *output* files (``{"custom_id", "response": {"status_code", "body":
{"choices": [{"message": {"content"}}]}}, "error"}`` per line), validates each answer with
:func:`scope.profiles.schema.parse_profile` and writes the valid ones into ``teacher_cache_dir``,
the cache :func:`scope.profiles.teachers.run_teacher` reads. A line that is not such an object
stops the import with file, line and field (with ``lenient: true`` it is counted and skipped, as
are bad trace rows); failed requests, unknown ``custom_id`` s and invalid profiles are counted and
each written to ``import_report``. Answers are cached one by one as read, so an import stopped by
a bad line keeps what it wrote (a rerun counts those as ``already_cached``).

Identity: ``custom_id`` is the cache key, ``sha256(teacher name + prompt)``, and the endpoint
teacher's name is ``endpoint:<teacher_base_url>:<teacher_model>:<temperature>``. Export and import
therefore take ``teacher_base_url`` and ``teacher_model``, the keys the later SFT run reads: give
them the values that run will use. No request is made here, so the URL need not be reachable;
every command prints the identity it used.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from scope.cli import parse_config, run_recipe
from scope.data.events import DataError, show
from scope.data.splits import UserSplitter
from scope.data.statistics import user_statistics
from scope.data.tsinghua import load_cohort
from scope.io import atomic_path
from scope.profiles.corpus import ProfileDataArguments, cohort_and_clusters, ensure_cohort, make_teacher
from scope.profiles.prompts import PromptBuilder, UserPrompt
from scope.profiles.schema import ProfileError, parse_profile
from scope.profiles.teachers import EndpointTeacher, TeacherCache, TeacherResult, batch_request

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "teacher.yaml"
MAX_LOGGED = 5        # rejected lines logged one by one; the rest only counted (all go to import_report)
log = logging.getLogger("recipes.teacher")


@dataclass
class TeacherBatchArguments(ProfileDataArguments):
    """The data and teacher keys of the SFT run (``teacher`` is taken as ``endpoint``) + the batch files."""

    requests_file: str = "runs/uscope/teacher_batch/requests.jsonl"     # export writes it
    results_files: list[str] = field(default_factory=lambda: ["runs/uscope/teacher_batch/results.jsonl"])  # import reads them
    import_report: str = "runs/uscope/teacher_batch/import_report.jsonl"  # import: every rejected answer, one per line


def endpoint_teacher(args: ProfileDataArguments) -> EndpointTeacher:
    """The endpoint teacher the SFT run builds from the same keys (its name is the cache identity)."""
    return make_teacher(replace(args, teacher="endpoint"))


def cohort_prompts(args: ProfileDataArguments) -> Iterator[UserPrompt]:
    """Every user's prompt, one at a time, in the order and form :func:`build_corpus` renders them
    (same cohort, clusters and templates), without running a teacher. With ``synthetic_ratio`` the
    synthetic users follow: as many as the corpus could add (it adds ``round(ratio x profiled train
    users)``, lowest ids first; here every train user counts as profiled, an upper bound)."""
    cohort, clusters = cohort_and_clusters(args)
    builder = PromptBuilder()
    for user, events in cohort.events.groupby("user_id", sort=True):
        yield builder(user_statistics(int(user), events, cohort.categories, clusters))
    if args.synthetic_cohort_dir and args.synthetic_ratio > 0:
        splitter = UserSplitter(cold_start_max_events=args.cold_start_max_events, seed=args.split_seed)
        n = round(args.synthetic_ratio * len(splitter.split(cohort.events)["train"]))
        synthetic = load_cohort(args.synthetic_cohort_dir, strict=True)
        users = set(sorted(int(u) for u in synthetic.user_ids)[:n])
        for user, events in synthetic.events.groupby("user_id", sort=True):
            if int(user) in users:
                yield builder(user_statistics(int(user), events, synthetic.categories, clusters))


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

def export_requests(args: TeacherBatchArguments) -> dict:
    """Write one OpenAI Batch request per uncached prompt to ``requests_file`` (atomically, streamed)."""
    teacher, cache = endpoint_teacher(args), TeacherCache(args.teacher_cache_dir)
    counts, seen = Counter(), set()
    with atomic_path(args.requests_file) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for prompt in cohort_prompts(args):
            counts["users"] += 1
            key = TeacherCache.key(teacher.name, prompt)
            if key in seen:           # the same prompt text as an earlier user: one request answers both
                counts["duplicate_prompts"] += 1
                continue
            seen.add(key)
            if cache.get(key) is not None:
                counts["cached"] += 1
                continue
            out.write(json.dumps(batch_request(teacher, prompt, key), ensure_ascii=False) + "\n")
            counts["requests"] += 1
    summary = {"command": "export", "identity": teacher.name, "users": counts["users"], "requests": counts["requests"],
               "cached": counts["cached"], "duplicate_prompts": counts["duplicate_prompts"],
               "requests_file": args.requests_file, "corrupted_cache_entries": len(cache.stats.corrupted)}
    print(f"wrote {counts['requests']} requests for {counts['users']} users ({counts['cached']} cached) to "
          f"{args.requests_file}; teacher identity {teacher.name}")
    print(json.dumps(summary))
    return summary


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------

@dataclass
class BatchAnswer:
    """One line of a batch output file: the ``custom_id`` and either the answer or why there is none."""

    custom_id: str
    content: str | None = None      # the message content (None: a refusal or an empty answer)
    failure: str | None = None      # the request failed (``error`` set, or a non-200 status)


def _get(obj: dict, key: str, kind: type | tuple[type, ...], path: Path, line: int, where: str, what: str):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        got = "nothing" if not isinstance(obj, dict) or key not in obj else show(value)
        raise DataError(path, line, where, f"expected {what}, got {got}")
    return value


def read_batch_line(text: bytes, path: Path, line: int) -> BatchAnswer:
    """One OpenAI-format batch output line; :class:`DataError` naming the file, line and field."""
    try:
        obj = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(path, line, None, f"not UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:
        raise DataError(path, line, None, f"not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    custom_id = _get(obj, "custom_id", str, path, line, "custom_id", "a string")
    if obj.get("error") is not None:
        return BatchAnswer(custom_id, failure=f"error: {json.dumps(obj['error'], ensure_ascii=False)[:300]}")
    response = _get(obj, "response", dict, path, line, "response", "an object (when 'error' is null)")
    status = _get(response, "status_code", int, path, line, "response.status_code", "an integer")
    body = response.get("body")
    if status != 200:
        return BatchAnswer(custom_id, failure=f"HTTP {status}: {json.dumps(body, ensure_ascii=False)[:300]}")
    body = _get(response, "body", dict, path, line, "response.body", "an object")
    choices = _get(body, "choices", list, path, line, "response.body.choices", "a list")
    if not choices:
        raise DataError(path, line, "response.body.choices", "expected at least one choice, got []")
    message = _get(choices[0], "message", dict, path, line, "response.body.choices[0].message", "an object")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise DataError(path, line, "response.body.choices[0].message.content",
                        f"expected a string or null, got {show(content)}")
    return BatchAnswer(custom_id, content=content)


def import_results(args: TeacherBatchArguments) -> dict:
    """Validate the answers of ``results_files`` and cache the valid ones under the teacher identity."""
    teacher, cache = endpoint_teacher(args), TeacherCache(args.teacher_cache_dir)
    user_of: dict[str, int] = {}
    for prompt in cohort_prompts(args):
        user_of.setdefault(TeacherCache.key(teacher.name, prompt), prompt.user_id)
    counts, done = Counter(), set()
    with atomic_path(args.import_report) as tmp, open(tmp, "w", encoding="utf-8") as report:
        def reject(kind: str, path: Path, line: int, message: str, custom_id=None, content=None) -> None:
            counts[kind] += 1
            if counts[kind] <= MAX_LOGGED:
                log.warning("%s:%d: %s: %s", path, line, kind, message)
            report.write(json.dumps({"file": str(path), "line": line, "kind": kind, "custom_id": custom_id,
                                     "user_id": user_of.get(custom_id), "error": message,
                                     "content": (content or "")[:2000]}, ensure_ascii=False) + "\n")

        for path in map(Path, args.results_files):
            with open(path, "rb") as lines:
                for line, text in enumerate(lines, 1):
                    if not text.strip():
                        continue
                    counts["answers"] += 1
                    try:
                        answer = read_batch_line(text, path, line)
                    except DataError as err:
                        if not args.lenient:
                            raise
                        reject("bad_lines", path, line, str(err).split(f"{path}:{line}: ", 1)[-1])
                        continue
                    key = answer.custom_id
                    if key not in user_of:
                        reject("unknown_ids", path, line, "no user of this cohort has this custom_id under teacher "
                               f"identity {teacher.name}", key, answer.content)
                    elif key in done:
                        counts["duplicates"] += 1
                    elif answer.failure is not None:
                        reject("failed_requests", path, line, answer.failure, key)
                    else:
                        try:
                            profile = parse_profile(answer.content or "")
                        except ProfileError as err:
                            reject("invalid_profiles", path, line, str(err), key, answer.content)
                            continue
                        done.add(key)
                        if cache.get(key) is not None:
                            counts["already_cached"] += 1
                        else:
                            cache.put(key, teacher.name, TeacherResult(user_of[key], profile, answer.content))
                            counts["imported"] += 1
    if counts["answers"] and counts["unknown_ids"] == counts["answers"]:
        raise ValueError(f"none of the {counts['answers']} answers in {args.results_files} belongs to a user of "
                         f"{ensure_cohort(args)} under teacher identity {teacher.name}: "
                         "export and import need the same cohort keys, teacher_base_url, teacher_model and prompts")
    missing = sum(not cache.path(k).exists() for k in user_of)
    summary = {"command": "import", "identity": teacher.name, "answers": counts["answers"],
               "imported": counts["imported"], "already_cached": counts["already_cached"],
               "duplicates": counts["duplicates"], "bad_lines": counts["bad_lines"],
               "failed_requests": counts["failed_requests"], "unknown_ids": counts["unknown_ids"],
               "invalid_profiles": counts["invalid_profiles"], "prompts_without_answer": missing,
               "import_report": args.import_report}
    print(f"cached {counts['imported']} new answers ({counts['already_cached']} already cached) of "
          f"{counts['answers']} in {len(args.results_files)} file(s); rejected: {counts['bad_lines']} bad lines, "
          f"{counts['failed_requests']} failed requests, {counts['unknown_ids']} unknown ids, "
          f"{counts['invalid_profiles']} invalid profiles (see {args.import_report}); "
          f"{missing} prompts still without an answer (export again to request them)")
    print(json.dumps(summary))
    return summary


COMMANDS = {"export": export_requests, "import": import_results}

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print("usage: python recipes/teacher.py export|import [--config FILE] [--key value ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_recipe(COMMANDS[sys.argv[1]],
                        *parse_config((TeacherBatchArguments,), argv=sys.argv[2:], default_config=DEFAULT_CONFIG)))
