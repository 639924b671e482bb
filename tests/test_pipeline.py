"""The stage runner (scope/run/pipeline.py) on toy stages: each is a tiny Python subprocess."""

import json
import os
import sys
import textwrap
import time

import pytest

from scope.run.pipeline import PipelineError, Stage, hash_path, run_pipeline, up_to_date

# A toy stage: copies its input file (or config) into out/result.txt, appending a tag; counts runs.
SCRIPT = textwrap.dedent("""
    import pathlib, sys
    src, out, tag = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    if tag == "fail":
        sys.exit(3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.txt").write_text(src.read_text() + tag)
    runs = out.parent / (out.name + ".runs")
    runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
    print("made", out / "result.txt")
""")


def toy(tmp_path, name, source, tag="+", needs=()):
    folder = tmp_path / "run" / name
    return Stage(name, [[sys.executable, str(tmp_path / "toy.py"), str(source), str(folder), tag]], folder,
                 configs=[tmp_path / "config.txt"], inputs=[source], outputs=[folder / "result.txt"],
                 needs=list(needs))


def runs(tmp_path, name) -> int:
    path = tmp_path / "run" / f"{name}.runs"
    return int(path.read_text()) if path.exists() else 0


@pytest.fixture
def chain(tmp_path):
    (tmp_path / "toy.py").write_text(SCRIPT)
    (tmp_path / "config.txt").write_text("lr: 1\n")
    (tmp_path / "data.txt").write_text("data")

    def make(tag_b="+"):
        a = toy(tmp_path, "a", tmp_path / "data.txt")
        b = toy(tmp_path, "b", a.folder / "result.txt", tag_b, needs=["a"])
        c = toy(tmp_path, "c", b.folder / "result.txt", needs=["b"])
        return [a, b, c]
    return make


def statuses(results):
    return [r.status for r in results]


def test_runs_in_order_then_skips_when_up_to_date(tmp_path, chain):
    stages = chain()
    assert statuses(run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lambda s: None)) == ["done"] * 3
    assert (tmp_path / "run" / "c" / "result.txt").read_text() == "data+++"
    lines = []
    assert statuses(run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lines.append)) == ["skipped"] * 3
    assert [runs(tmp_path, n) for n in "abc"] == [1, 1, 1]
    assert any("skipped, up to date" in line for line in lines)
    assert "peak RSS MB" in lines[-1]  # the final per-stage table


def test_stage_record_contents(tmp_path, chain):
    stages = chain()
    run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lambda s: None)
    record = json.loads((tmp_path / "run" / "b" / "stage.json").read_text())
    assert record["status"] == "ok" and record["stage"] == "b"
    assert record["inputs"] == {str(tmp_path / "run" / "a" / "result.txt"): hash_path(tmp_path / "run" / "a" / "result.txt")}
    assert set(record["configs"]) == {str(tmp_path / "config.txt")}
    assert {"torch", "transformers", "trl", "peft", "uscope"} <= set(record["versions"])
    assert record["wall_s"] > 0 and record["cpu_s"] > 0 and record["peak_rss_mb"] > 5  # a Python interpreter
    assert record["finished_at"] >= record["started_at"]
    assert "made" in (tmp_path / "run" / "b" / "stage.log").read_text()


def test_config_change_reruns_the_stage_and_input_change_propagates(tmp_path, chain):
    stages = chain()
    run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lambda s: None)
    (tmp_path / "config.txt").write_text("lr: 2\n")  # every toy stage reads this config
    assert statuses(run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lambda s: None)) == ["done"] * 3
    time.sleep(0.01)
    (tmp_path / "run" / "b" / "result.txt").write_text("edited")  # b's output (c's input) changed
    assert up_to_date(stages[1])[0]  # b's own inputs did not change
    assert not up_to_date(stages[2])[0]
    assert statuses(run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lambda s: None)) == ["skipped", "skipped", "done"]
    # a changed command line (e.g. an override) is a changed configuration
    assert statuses(run_pipeline(chain(tag_b="*"), cwd=tmp_path, quiet=True,
                                 print_fn=lambda s: None)) == ["skipped", "done", "done"]


def test_only_and_from_force_reruns(tmp_path, chain):
    stages = chain()
    run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lambda s: None)
    assert statuses(run_pipeline(stages, cwd=tmp_path, only="b", quiet=True, print_fn=lambda s: None)) == ["done"]
    assert [runs(tmp_path, n) for n in "abc"] == [1, 2, 1]
    # c's input (b's output) was rewritten, so c reruns on the next plain run
    assert statuses(run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lambda s: None)) == ["skipped", "skipped", "done"]
    assert statuses(run_pipeline(stages, cwd=tmp_path, start="b", quiet=True, print_fn=lambda s: None)) == ["skipped", "done", "done"]
    assert statuses(run_pipeline(stages, cwd=tmp_path, force=True, quiet=True, print_fn=lambda s: None)) == ["done"] * 3
    with pytest.raises(PipelineError, match="unknown stage 'x'"):
        run_pipeline(stages, cwd=tmp_path, only="x", quiet=True, print_fn=lambda s: None)


def test_resume_after_a_failed_or_interrupted_stage(tmp_path, chain):
    with pytest.raises(PipelineError, match="stage b failed"):
        run_pipeline(chain(tag_b="fail"), cwd=tmp_path, quiet=True, print_fn=lambda s: None)
    assert (tmp_path / "run" / "a" / "stage.json").exists() and not (tmp_path / "run" / "b" / "stage.json").exists()
    # keep_going: stages needing the failed one are blocked, not run
    results = run_pipeline(chain(tag_b="fail"), cwd=tmp_path, keep_going=True, quiet=True, print_fn=lambda s: None)
    assert statuses(results) == ["skipped", "failed", "blocked"]
    # an interrupted stage: its outputs exist but its record was never written -> it runs again
    stages = chain()
    (tmp_path / "run" / "b").mkdir(exist_ok=True)
    (tmp_path / "run" / "b" / "result.txt").write_text("half written")
    assert statuses(run_pipeline(stages, cwd=tmp_path, quiet=True, print_fn=lambda s: None)) == ["skipped", "done", "done"]
    assert (tmp_path / "run" / "c" / "result.txt").read_text() == "data+++"
    assert runs(tmp_path, "a") == 1


def test_missing_requirement_makes_a_stage_unavailable_not_failed(tmp_path, chain):
    a, b, c = chain()
    b.requires = [tmp_path / "recipes" / "not_there.py"]
    c.needs = ["b"]
    results = run_pipeline([a, b, c], cwd=tmp_path, keep_going=True, quiet=True, print_fn=lambda s: None)
    assert statuses(results) == ["done", "unavailable", "blocked"]


def test_hash_path_ignores_the_runner_files_and_sees_content_changes(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"1")
    before = hash_path(folder)
    (folder / "stage.json").write_text("{}")
    (folder / "stage.log").write_text("log")
    assert hash_path(folder) == before
    (folder / "sub" / "x.bin").write_bytes(b"12")
    assert hash_path(folder) != before
    assert hash_path(tmp_path / "absent") == "missing"
    os.utime(folder / "sub" / "x.bin", ns=(1, 1))
    assert hash_path(folder) != before


def test_a_finished_stage_reruns_from_an_empty_folder_an_interrupted_one_keeps_it(tmp_path, chain):
    a, b, c = chain()
    run_pipeline([a, b, c], cwd=tmp_path, quiet=True, print_fn=lambda s: None)
    (tmp_path / "run" / "b" / "stale-checkpoint").write_text("from another config")
    run_pipeline([a, b, c], cwd=tmp_path, only="b", quiet=True, print_fn=lambda s: None)
    assert not (tmp_path / "run" / "b" / "stale-checkpoint").exists()
    (tmp_path / "run" / "b" / "stage.json").unlink()  # as if killed mid-stage: the checkpoint is kept
    (tmp_path / "run" / "b" / "checkpoint").write_text("resume me")
    run_pipeline([a, b, c], cwd=tmp_path, quiet=True, print_fn=lambda s: None)
    assert (tmp_path / "run" / "b" / "checkpoint").exists()


def test_always_stages_rerun_and_status_file_lists_every_stage(tmp_path, chain):
    a, b, c = chain()
    c.always = True
    status = tmp_path / "run" / "pipeline.json"
    run_pipeline([a, b, c], cwd=tmp_path, quiet=True, print_fn=lambda s: None, status_path=status)
    assert statuses(run_pipeline([a, b, c], cwd=tmp_path, quiet=True, print_fn=lambda s: None,
                                 status_path=status)) == ["skipped", "skipped", "done"]
    rows = json.loads(status.read_text())["stages"]
    assert [(r["stage"], r["status"]) for r in rows] == [("a", "skipped"), ("b", "skipped"), ("c", "done")]
    assert all(r["wall_s"] is not None and r["commands"] for r in rows)


def test_demo_stages_and_command_line():
    from recipes.demo import parse, stages

    args = parse(["--config", "recipes/configs/demo.yaml", "--from", "dpo", "--output_dir", "/tmp/x"])
    assert args.from_stage == "dpo" and args.output_dir == "/tmp/x"
    pipeline = stages(args)
    assert [s.name for s in pipeline] == ["cohort", "tensors", "summary", "sft", "dpo", "evaluate", "novelty", "synthesis", "embed",
                                          "completion", "compare", "pituning", "lightgbm", "report"]
    by_name = {s.name: s for s in pipeline}
    assert all(str(s.folder).startswith("/tmp/x/") for s in pipeline)
    assert "/tmp/x/sft" in " ".join(by_name["dpo"].commands[0]) and by_name["dpo"].needs == ["sft"]
    assert by_name["report"].always and "/data" not in " ".join(" ".join(c) for s in pipeline for c in s.commands)


def test_an_interrupted_stage_whose_config_changed_starts_afresh(tmp_path, chain):
    a, b, c = chain()
    run_pipeline([a, b, c], cwd=tmp_path, quiet=True, print_fn=lambda s: None)
    (tmp_path / "run" / "b" / "stage.json").unlink()
    (tmp_path / "run" / "b" / "stage.started.json").write_text('{"config_hash": "another configuration"}')
    (tmp_path / "run" / "b" / "checkpoint").write_text("of another configuration")
    run_pipeline([a, b, c], cwd=tmp_path, quiet=True, print_fn=lambda s: None)
    assert not (tmp_path / "run" / "b" / "checkpoint").exists()
    assert not (tmp_path / "run" / "b" / "stage.started.json").exists()


def test_until_stops_after_a_stage(tmp_path, chain):
    assert statuses(run_pipeline(chain(), cwd=tmp_path, until="b", quiet=True, print_fn=lambda s: None)) == ["done", "done"]
    assert not (tmp_path / "run" / "c").exists()


def test_demo_data_stages_end_to_end(tmp_path):
    from recipes import demo

    args = demo.DemoArguments(output_dir=str(tmp_path), n_users=10, days=2, until="summary", quiet=True)
    assert demo.main(args) == 0
    for name in ("summary.md", "summary.json", "activity_by_group.png", "apps_by_group.png", "example_tensor.png"):
        assert (tmp_path / "summary" / name).stat().st_size > 0
    assert json.loads((tmp_path / "summary" / "summary.json").read_text())["users"] == 10
    assert json.loads((tmp_path / "tensors" / "stage.json").read_text())["inputs"][str(tmp_path / "cohort")] != "missing"
    assert demo.main(args) == 0  # everything up to date: skipped
    rows = json.loads((tmp_path / "pipeline.json").read_text())["stages"]
    assert [r["status"] for r in rows[:3]] == ["skipped"] * 3


# A stage that records when it ran: [start, end] in out/span.json, after sleeping.
SLEEPER = textwrap.dedent("""
    import json, pathlib, sys, time
    out, seconds = pathlib.Path(sys.argv[1]), float(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    start = time.time(); time.sleep(seconds)
    (out / "span.json").write_text(json.dumps([start, time.time()]))
""")


def test_two_jobs_overlap_independent_stages_and_keep_dependencies(tmp_path):
    (tmp_path / "sleep.py").write_text(SLEEPER)

    def stage(name, needs=(), inputs=()):
        folder = tmp_path / "run" / name
        return Stage(name, [[sys.executable, str(tmp_path / "sleep.py"), str(folder), "1.0"]], folder,
                     outputs=[folder / "span.json"], needs=list(needs), inputs=list(inputs))
    a = stage("a")
    b = stage("b", needs=["a"])
    c = stage("c")                                     # independent of a and b
    d = stage("d", inputs=[b.folder, c.folder])        # waits for both through its inputs
    results = run_pipeline([a, b, c, d], cwd=tmp_path, jobs=2, quiet=True, print_fn=lambda s: None)
    assert statuses(results) == ["done"] * 4
    span = {s: json.loads((tmp_path / "run" / s / "span.json").read_text()) for s in "abcd"}
    assert span["c"][0] < span["a"][1]                 # c ran beside a
    assert span["b"][0] >= span["a"][1]                # b waited for a
    assert span["d"][0] >= max(span["b"][1], span["c"][1])


def test_two_jobs_a_failure_blocks_its_dependants_only(tmp_path, chain):
    a, b, c = chain(tag_b="fail")
    (tmp_path / "other.txt").write_text("other")
    other = toy(tmp_path, "other", tmp_path / "other.txt")
    results = run_pipeline([a, b, c, other], cwd=tmp_path, jobs=2, keep_going=True, quiet=True,
                           print_fn=lambda s: None)
    assert statuses(results) == ["done", "failed", "blocked", "done"]
    with pytest.raises(PipelineError, match="stage b failed"):
        run_pipeline(chain(tag_b="fail"), cwd=tmp_path, jobs=2, quiet=True, print_fn=lambda s: None)


def test_floor_warnings_of_a_finished_stage_reach_its_log(tmp_path, chain):
    a, b, c = chain()
    lines = []
    run_pipeline([a, b, c], cwd=tmp_path, quiet=True, print_fn=lines.append,
                 on_done=lambda stage: ["schema_valid 0.10 < 0.5"] if stage.name == "b" else [])
    assert "WARNING (result below its floor): schema_valid 0.10 < 0.5" in (tmp_path / "run" / "b" / "stage.log").read_text()
    assert any("b: WARNING" in line for line in lines)
    assert "WARNING" not in (tmp_path / "run" / "c" / "stage.log").read_text()


def test_the_demo_teacher_reaches_every_profiling_stage_and_jobs_set_priorities():
    from recipes.demo import CRITICAL_PATH, parse, stages

    args = parse(["--config", "recipes/configs/demo.yaml", "--output_dir", "/tmp/x", "--teacher", "endpoint",
                  "--teacher_model", "qwen3", "--teacher_base_url", "http://127.0.0.1:8080/v1"])
    by_name = {s.name: s for s in stages(args)}
    for name in ("sft", "dpo", "evaluate", "novelty", "embed", "synthesis"):
        for command in by_name[name].commands:
            line = " ".join(command)
            assert "--teacher endpoint --teacher_model qwen3 --teacher_base_url http://127.0.0.1:8080/v1" in line, name
            assert "--teacher_cache_dir /tmp/x/teacher_cache" in line, name
    assert {s.name for s in by_name.values() if s.nice == 0} == set(CRITICAL_PATH)
    assert all(s.env["OMP_WAIT_POLICY"] == "PASSIVE" for s in by_name.values())
    assert all(int(s.env["MALLOC_MMAP_THRESHOLD_"]) == 32 << 20 for s in by_name.values())   # glibc reads it at start
    sequential = stages(parse(["--config", "recipes/configs/demo.yaml", "--jobs", "1"]))
    assert all(s.nice == 0 and "OMP_WAIT_POLICY" not in s.env for s in sequential)


def test_the_demo_precision_reaches_the_lm_stages(monkeypatch):
    import recipes.demo as demo

    def lines(precision):
        by_name = {s.name: s for s in demo.stages(demo.parse(["--config", "recipes/configs/demo.yaml", "--precision",
                                                              precision]))}
        return {name: [" ".join(c) for c in by_name[name].commands] for name in by_name}

    bf16 = lines("bfloat16")
    for name in ("sft", "dpo", "synthesis"):
        assert all("--bf16 true" in line for line in bf16[name]), name
    for name in ("dpo", "evaluate", "novelty", "synthesis"):
        assert all("--inference_dtype bfloat16" in line for line in bf16[name]), name
    fp32 = lines("float32")
    assert all("--bf16 false" in line for line in fp32["sft"]) and "--inference_dtype float32" in fp32["evaluate"][0]
    monkeypatch.setattr(demo, "native_bf16_cpu", lambda: False)
    assert lines("auto") == fp32                                     # no native bf16: emulated bf16 is slower
    monkeypatch.setattr(demo, "native_bf16_cpu", lambda: True)
    assert lines("auto") == bf16
    with pytest.raises(ValueError, match="precision must be one of"):
        demo.resolve_precision("half")
