"""The endpoint teacher against the project's own server (``recipes/serve.py`` on loopback,
schema-constrained decoding): users/s at each concurrency for ``run_teacher`` + ``EndpointTeacher``
(retries, validation, cache writes) against a raw ``http.client`` client POSTing the same request
bodies at the same concurrency (overhead = raw_users_per_s / users_per_s - 1, medians of ``rounds``
alternated pairs; the client's CPU ms per user too, which a loaded machine disturbs less), then kill and
resume: a ``run_teacher`` in a subprocess is killed with SIGKILL once ``kill_after`` users are
cached, and the rerun must request only the users not cached.

    python -m benchmarks.teacher [--users 32 --rounds 3 --concurrency 1 4 16 --max_tokens 300 --kill_after 10]
    python benchmarks/teacher.py ...                                  # the same

``--model tiny`` (default) serves a 2-layer random Llama with the SmolLM2 tokenizer (built in
``work_dir``), so the figures measure the client side and the server's constrained decoding, not a
real model's speed; ``--model smollm2-135m-instruct`` serves the packaged model. The server
generates one answer at a time, so more concurrency mostly overlaps HTTP, JSON and validation.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import emit, peak_rss_mb

SERVED_NAME = "tiny"


def tiny_model(out: Path) -> Path:
    """A 2-layer, 32-wide random Llama with the SmolLM2 tokenizer (as the tests use), built once."""
    if (out / "config.json").exists():
        return out
    from scope.profiles.llms import load_tokenizer, save_random_llama

    return save_random_llama(out, load_tokenizer("smollm2-135m-instruct"))


def corpus_of(work_dir: Path, users: int):
    """The benchmark cohort (simulated once) with its prompts (grounded teacher, cached)."""
    from scope.data.simulate import CohortConfig, simulate_cohort
    from scope.data.tsinghua import TRACE_FILE
    from scope.profiles.corpus import ProfileDataArguments, build_corpus

    cohort = work_dir / f"cohort-{users}"
    if not (cohort / TRACE_FILE).exists():
        simulate_cohort(CohortConfig(n_users=users, days=2, seed=11, cold_start_fraction=0.0, n_stations=300,
                                     n_apps=200), cohort, progress=False)
    return build_corpus(ProfileDataArguments(cohort_dir=str(cohort), teacher_cache_dir=str(work_dir / "grounded-cache")))


def make_teacher(url: str, corpus, args, concurrency: int):
    from scope.profiles.schema import generation_schema
    from scope.profiles.teachers import EndpointTeacher

    schema = generation_schema(corpus.cohort.categories, corpus.clusters.names, max_chars=args.max_chars)
    return EndpointTeacher(url, SERVED_NAME, concurrency=concurrency, timeout_s=args.timeout_s, max_retries=2,
                           backoff_s=0.2, max_tokens=args.max_tokens, schema=schema)


def start_server(model_dir: str, args) -> tuple[subprocess.Popen, str]:
    from recipes.serve import launch

    log = open(Path(args.work_dir) / "server.log", "w")
    return launch(model_dir, "--served_model_name", SERVED_NAME, "--constrained", "true",
                  "--workers", str(2 * max(args.concurrency) + 2), "--threads", str(args.server_threads),
                  "--max_tokens_limit", str(max(args.max_tokens, 16)), log=log, timeout_s=300)


def raw_run(teacher, prompts, concurrency: int) -> tuple[float, float, int]:
    """Plain http.client POSTs of the teacher's request bodies: (seconds, client CPU seconds, valid answers)."""
    from scope.profiles.schema import ProfileError, parse_profile

    bodies = [json.dumps(teacher.request_body(p.messages)).encode() for p in prompts]

    def post(body: bytes) -> str:
        conn = http.client.HTTPConnection(teacher._host, teacher._port, timeout=teacher.timeout_s)
        try:
            conn.request("POST", teacher._path, body, {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        return reply["choices"][0]["message"]["content"]

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        contents = list(pool.map(post, bodies))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    valid = 0
    for content in contents:
        try:
            parse_profile(content)
            valid += 1
        except ProfileError:
            pass
    return seconds, cpu, valid


def teacher_run(teacher, prompts, cache_dir: Path) -> tuple[float, float, list]:
    """run_teacher with a fresh cache: (seconds, client CPU seconds, results)."""
    from scope.profiles.teachers import TeacherCache, run_teacher

    start, cpu = time.perf_counter(), time.process_time()
    results = run_teacher(teacher, prompts, TeacherCache(cache_dir))
    return time.perf_counter() - start, time.process_time() - cpu, results


def cached_entries(cache_dir: Path) -> int:
    return sum(1 for _ in cache_dir.rglob("*.json")) if cache_dir.exists() else 0


def resume_worker(args) -> None:
    """The subprocess that gets killed: run_teacher over every prompt, one at a time."""
    corpus = corpus_of(Path(args.work_dir), args.users)
    teacher = make_teacher(args.url, corpus, args, 1)
    from scope.profiles.teachers import TeacherCache, run_teacher

    run_teacher(teacher, [corpus.prompts[u] for u in sorted(corpus.prompts)], TeacherCache(args.cache_dir))


def kill_and_resume(url: str, corpus, args) -> dict:
    from scope.profiles.teachers import TeacherCache, run_teacher

    cache_dir = Path(args.work_dir) / "cache-resume"
    if cache_dir.exists():
        import shutil
        shutil.rmtree(cache_dir)
    worker = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--resume_worker", "--url", url,
                               "--cache_dir", str(cache_dir), "--work_dir", args.work_dir, "--users", str(args.users),
                               "--max_tokens", str(args.max_tokens), "--max_chars", str(args.max_chars),
                               "--timeout_s", str(args.timeout_s)],
                              cwd="/", stdout=subprocess.DEVNULL, stderr=open(Path(args.work_dir) / "worker.log", "w"))
    deadline = time.time() + 600
    while cached_entries(cache_dir) < args.kill_after and worker.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    worker.kill()                    # SIGKILL: no clean-up runs
    worker.wait()
    after_kill = cached_entries(cache_dir)

    teacher = make_teacher(url, corpus, args, 1)
    requests = {"n": 0}
    plain_request = teacher._request

    def counted(messages):
        requests["n"] += 1
        return plain_request(messages)

    teacher._request = counted
    cache = TeacherCache(cache_dir)
    prompts = [corpus.prompts[u] for u in sorted(corpus.prompts)]
    results = run_teacher(teacher, prompts, cache)
    return {"users": len(prompts), "killed_after": args.kill_after, "cached_after_kill": after_kill,
            "requests_after_resume": requests["n"], "cache_hits": cache.stats.hits,
            "valid_after_resume": sum(r.ok for r in results), "worker_exit": worker.returncode}


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3, help="raw / teacher pairs per concurrency (median)")
    parser.add_argument("--max_tokens", type=int, default=300)
    parser.add_argument("--max_chars", type=int, default=8, help="cap on every string of the schema")
    parser.add_argument("--kill_after", type=int, default=10)
    parser.add_argument("--timeout_s", type=float, default=300.0)
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer Llama), a registry name or a folder")
    parser.add_argument("--server_threads", type=int, default=1)
    parser.add_argument("--work_dir", default="/tmp/uscope-teacher-bench")
    parser.add_argument("--resume_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work_dir = str(Path(args.work_dir).resolve())
    from scope.profiles import teachers
    teachers.PROGRESS_MIN_USERS = 1 << 30             # no progress bar: it writes a line per update to a log
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.resume_worker:
        return resume_worker(args)

    load_before = os.getloadavg()
    corpus = corpus_of(Path(args.work_dir), args.users)
    prompts = [corpus.prompts[u] for u in sorted(corpus.prompts)]
    model = str(tiny_model(Path(args.work_dir) / "tiny-llama")) if args.model == "tiny" else args.model
    server, url = start_server(model, args)
    try:
        warm = make_teacher(url, corpus, args, 1)
        raw_run(warm, prompts[:1], 1)               # compiles the schema on the server
        users_per_s, raw_users_per_s, overhead, cpu_ms, detail = {}, {}, {}, {}, {}
        for c in args.concurrency:
            teacher = make_teacher(url, corpus, args, c)
            raw_s, teacher_s, raw_cpu, teacher_cpu, raw_valid, attempts, failures = [], [], [], [], [], 0, 0
            for r in range(args.rounds):
                seconds, cpu, valid = raw_run(teacher, prompts, c)
                raw_s.append(seconds)
                raw_cpu.append(cpu)
                raw_valid.append(valid)
                seconds, cpu, results = teacher_run(teacher, prompts,
                                                    Path(args.work_dir) / f"cache-c{c}-r{r}-{time.time_ns()}")
                teacher_s.append(seconds)
                teacher_cpu.append(cpu)
                attempts += sum(x.attempts for x in results)
                failures += sum(not x.ok for x in results)
            users_per_s[c] = round(len(prompts) / statistics.median(teacher_s), 3)
            raw_users_per_s[c] = round(len(prompts) / statistics.median(raw_s), 3)
            overhead[c] = round(raw_users_per_s[c] / users_per_s[c] - 1, 3)
            cpu_ms[c] = {"teacher": round(1000 * statistics.median(teacher_cpu) / len(prompts), 2),
                         "raw": round(1000 * statistics.median(raw_cpu) / len(prompts), 2)}
            detail[c] = {"teacher_s": [round(s, 2) for s in teacher_s], "raw_s": [round(s, 2) for s in raw_s],
                         "raw_valid": raw_valid, "teacher_attempts": attempts, "teacher_failures": failures}
            print(f"concurrency {c}: teacher {users_per_s[c]} users/s, raw {raw_users_per_s[c]} users/s, "
                  f"overhead {overhead[c]:+.1%}; client CPU ms/user {cpu_ms[c]} ({detail[c]})", flush=True)
        resume = kill_and_resume(url, corpus, args)
        print(f"kill and resume: {resume}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return emit("teacher", {"users": len(prompts), "model": args.model, "max_tokens": args.max_tokens,
                            "users_per_s": users_per_s, "raw_users_per_s": raw_users_per_s, "overhead": overhead,
                            "client_cpu_ms_per_user": cpu_ms, "runs": detail, "resume": resume, "rounds": args.rounds,
                            "server_threads": args.server_threads,
                            "load_average_before": [round(x, 2) for x in load_before],
                            "load_average_after": [round(x, 2) for x in os.getloadavg()],
                            "peak_rss_mb": round(peak_rss_mb(), 1)})


if __name__ == "__main__":
    main()
