"""The teacher offline (recipes/teacher.py): OpenAI Batch JSONL out, batch answers into the teacher
cache, and a later endpoint run that finds every imported answer cached and requests nothing."""

import json
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recipes.teacher import TeacherBatchArguments, export_requests, import_results, read_batch_line
from scope.data.events import DataError
from scope.data.simulate import CohortConfig, simulate_cohort
from scope.profiles.corpus import ProfileDataArguments, build_corpus
from scope.profiles.schema import profile_json_schema
from scope.profiles.teachers import EndpointTeacher, TeacherCache, batch_request, run_teacher

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("batch-cohort")
    simulate_cohort(CohortConfig(n_users=8, days=2, seed=3, n_stations=200, n_apps=100, cold_start_fraction=0.0),
                    out, progress=False)
    return out


@pytest.fixture(scope="module")
def grounded(cohort, tmp_path_factory):
    """The cohort profiled by the grounded teacher through build_corpus: the prompts SFT would build."""
    return build_corpus(ProfileDataArguments(cohort_dir=str(cohort),
                                             teacher_cache_dir=str(tmp_path_factory.mktemp("grounded-cache"))))


@pytest.fixture
def args(cohort, tmp_path) -> TeacherBatchArguments:
    """Export / import settings; the identity's URL is a closed port (nothing may be requested)."""
    return TeacherBatchArguments(cohort_dir=str(cohort), teacher="endpoint", teacher_model=MODEL,
                                 teacher_base_url=f"http://127.0.0.1:{closed_port()}/v1", teacher_max_new_tokens=300,
                                 teacher_max_retries=0, teacher_timeout_s=5.0, teacher_cache_dir=str(tmp_path / "cache"),
                                 requests_file=str(tmp_path / "requests.jsonl"),
                                 results_files=[str(tmp_path / "results.jsonl")],
                                 import_report=str(tmp_path / "import_report.jsonl"))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def output_line(custom_id: str, content: str | None = None, status: int = 200, error: dict | None = None) -> str:
    """One line of an OpenAI batch output file."""
    body = {"id": "chatcmpl-x", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
    response = None if error else {"status_code": status, "request_id": "req-1", "body": body}
    return json.dumps({"id": f"batch_req_{custom_id[:8]}", "custom_id": custom_id, "response": response,
                       "error": error})


def test_export_writes_one_openai_batch_request_per_user(args, grounded):
    summary = export_requests(args)
    lines = read_jsonl(args.requests_file)
    teacher = EndpointTeacher(args.teacher_base_url, MODEL)
    users = sorted(grounded.prompts)
    assert summary["requests"] == len(lines) == len(users) == 8 and summary["identity"] == teacher.name
    expected_format = {"type": "json_schema", "json_schema": {"name": "profile", "schema": profile_json_schema(),
                                                              "strict": True}}
    for line, user in zip(lines, users):
        prompt = grounded.prompts[user]
        assert set(line) == {"custom_id", "method", "url", "body"}
        assert line["custom_id"] == TeacherCache.key(teacher.name, prompt)     # the key run_teacher looks up
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        assert line["body"] == {"model": MODEL, "messages": prompt.messages, "max_tokens": 300, "temperature": 0,
                                "response_format": expected_format}
    assert len({line["custom_id"] for line in lines}) == len(lines)


def test_batch_body_is_what_the_endpoint_teacher_posts(grounded):
    """The exported body equals, field for field, the one EndpointTeacher sends over HTTP."""
    seen, prompt = [], grounded.prompts[sorted(grounded.prompts)[0]]
    answer = grounded.results[prompt.user_id].raw

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        teacher = EndpointTeacher(f"http://127.0.0.1:{server.server_address[1]}/v1", MODEL, max_tokens=300,
                                  max_retries=0)
        (result,) = teacher.generate([prompt])
    finally:
        server.shutdown()
        server.server_close()
    assert result.ok and seen == [batch_request(teacher, prompt)["body"]]


def test_import_caches_exactly_the_valid_answers_and_the_endpoint_run_requests_nothing(args, grounded, tmp_path):
    export_requests(args)
    ids = [line["custom_id"] for line in read_jsonl(args.requests_file)]
    user_of = {TeacherCache.key(EndpointTeacher(args.teacher_base_url, MODEL).name, p): u
               for u, p in grounded.prompts.items()}
    answers = [grounded.results[user_of[i]].raw for i in ids]
    invalid, failed, valid = ids[0], ids[1], ids[2:]
    lines = [output_line(invalid, '{"persona": "x"}'),
             output_line(failed, error={"code": "server_error", "message": "boom"}),
             *(output_line(i, a) for i, a in zip(valid[:3], answers[2:5])),
             '{"custom_id": "garbled',
             output_line("0" * 64, answers[2]),                                  # unknown custom_id
             *(output_line(i, a) for i, a in zip(valid[3:], answers[5:]))]
    Path(args.results_files[0]).write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as err:             # strict: the garbled line stops the import, located
        import_results(replace(args, teacher_cache_dir=str(tmp_path / "strict-cache")))
    assert (err.value.path, err.value.line) == (args.results_files[0], 6) and "not JSON" in str(err.value)

    summary = import_results(replace(args, lenient=True))
    assert {k: summary[k] for k in ("answers", "imported", "bad_lines", "unknown_ids", "invalid_profiles",
                                    "failed_requests", "prompts_without_answer")} == {
        "answers": 10, "imported": 6, "bad_lines": 1, "unknown_ids": 1, "invalid_profiles": 1, "failed_requests": 1,
        "prompts_without_answer": 2}
    cached = {p.stem for p in Path(args.teacher_cache_dir).rglob("*.json")}
    assert cached == set(valid)
    report = read_jsonl(args.import_report)
    assert sorted(r["kind"] for r in report) == ["bad_lines", "failed_requests", "invalid_profiles", "unknown_ids"]
    assert next(r for r in report if r["kind"] == "invalid_profiles")["user_id"] == user_of[invalid]

    # The endpoint teacher of the same identity (its URL a closed port) requests only the two users left.
    class Counting(EndpointTeacher):
        requests = 0

        def _request(self, messages):
            Counting.requests += 1
            return super()._request(messages)

    teacher = Counting(args.teacher_base_url, MODEL, max_retries=0, timeout_s=5)
    users = sorted(grounded.prompts)
    results = dict(zip(users, run_teacher(teacher, [grounded.prompts[u] for u in users],
                                          TeacherCache(args.teacher_cache_dir))))
    left = {user_of[invalid], user_of[failed]}
    assert Counting.requests == 2
    assert all(r.cached and r.profile == grounded.results[u].profile for u, r in results.items() if u not in left)
    assert all(not results[u].ok and "unreachable" in results[u].error for u in left)

    # build_corpus with teacher: endpoint and the same keys (the SFT path) finds the same entries.
    corpus = build_corpus(replace(args, max_teacher_failure_fraction=1.0))
    assert {u for u, r in corpus.results.items() if r.cached} == set(users) - left

    # Export again: only the two users without an answer; import again: nothing new.
    assert export_requests(args)["requests"] == 2 and {x["custom_id"] for x in read_jsonl(args.requests_file)} == {
        invalid, failed}
    again = import_results(replace(args, lenient=True))
    assert again["imported"] == 0 and again["already_cached"] == 6


def test_import_under_another_identity_is_refused(args, grounded):
    export_requests(args)
    ids = [line["custom_id"] for line in read_jsonl(args.requests_file)]
    Path(args.results_files[0]).write_text("".join(output_line(i, "{}") + "\n" for i in ids))
    with pytest.raises(ValueError, match="none of the 8 answers"):
        import_results(replace(args, teacher_base_url="http://other-host:8000/v1"))
    assert not Path(args.teacher_cache_dir).exists()


@pytest.mark.parametrize("line, field", [
    (b"[1]", None),
    (b"\xff\xfe", None),
    (b'{"response": null}', "custom_id"),
    (b'{"custom_id": "a", "error": null}', "response"),
    (b'{"custom_id": "a", "response": {"status_code": "200"}}', "response.status_code"),
    (b'{"custom_id": "a", "response": {"status_code": 200, "body": {"choices": []}}}', "response.body.choices"),
    (b'{"custom_id": "a", "response": {"status_code": 200, "body": {"choices": [{"message": {"content": 5}}]}}}',
     "response.body.choices[0].message.content"),
])
def test_bad_output_lines_name_the_field(line, field):
    with pytest.raises(DataError) as err:
        read_batch_line(line, Path("out.jsonl"), 7)
    assert (err.value.path, err.value.line, err.value.field) == ("out.jsonl", 7, field)


def test_failed_requests_are_answers_without_content():
    error = read_batch_line(output_line("a", error={"message": "quota"}).encode(), Path("x"), 1)
    status = read_batch_line(output_line("b", "{}", status=429).encode(), Path("x"), 2)
    assert "quota" in error.failure and status.failure.startswith("HTTP 429") and error.content is None


def test_cli_import_stops_at_a_bad_line_naming_file_line_and_field(args, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(output_line("a" * 64, "{}") + "\n" + '{"custom_id": "b", "response": {"status_code": 200, '
                   '"body": {"choices": [{"message": {"content": 5}}]}}}\n')
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "teacher.py"), "import", "--cohort_dir",
                           args.cohort_dir, "--teacher_model", MODEL, "--teacher_cache_dir", args.teacher_cache_dir,
                           "--results_files", str(bad), "--import_report", args.import_report],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{bad}:2: field 'response.body.choices[0].message.content'" in done.stderr
