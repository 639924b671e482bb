"""Multi-process training, proven: SFT, DPO and the completion engine each train with 2 processes
on CPU (gloo), started the way a user starts them on GPUs,

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml --num_processes 2 ...

(accelerate runs torchrun; the recipes' ``use_cpu: true`` / ``device: cpu`` make it gloo on CPU).
Each rank runs ``tests/multiprocess_worker.py``, which calls the recipes' own ``main`` one job
after another and records, per job and rank, the rows it trained on, a hash of its weights, the
files it wrote and its step times. The jobs: SFT 1 step, then resumed to 2; DPO (on that SFT
adapter) likewise; completion 2 steps (and calibration), resumed to 4, and 4 steps straight. A
one-process run of the same recipes with the same global batch gives the reference rows and step
times. Checked: both ranks hold identical weights; each rank trained on its own shard of the global
batch (and the shards together are the one-process batch); only rank 0 wrote the checkpoint (HF's
Trainer also writes each rank's RNG state, ``rng_state_<rank>.pth``, by design); resume continues
from the checkpoint (completion: exactly, 2 + 2 steps == 4 straight). The step times, 1 vs 2
processes, are printed (``-s``) and written to ``step_times.txt``, not asserted.

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's multi-CPU
launcher needs mpirun); a MULTI_GPU launch config runs torchrun, which is what a CPU machine needs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from scope.profiles.corpus import build_corpus
from scope.profiles.sft import check_adapter
from tests.conftest import SHARED_DATA, shared_data
from tests.scope.conftest import data_args, tiny_model_dir, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"
DDP = ROOT / "recipes" / "accelerate_configs" / "ddp.yaml"
NJ = SHARED_DATA / "uomo-nj" / "nj_traffic_users_64.npz"
LAUNCH_TIMEOUT_S = 420


def test_the_adapter_check_refuses_an_empty_adapter(tmp_path):
    lora = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(4, 32),
            "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(32, 4)}
    save_file(lora, str(tmp_path / "adapter_model.safetensors"))
    check_adapter(tmp_path)
    for broken in ({k: torch.zeros(0) for k in lora}, {}, {next(iter(lora)): torch.ones(4, 32)}):
        save_file(broken, str(tmp_path / "adapter_model.safetensors"))  # ZeRO-3's 40-byte file, one half
        with pytest.raises(RuntimeError, match="empty LoRA adapter"):
            check_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="missing"):
        check_adapter(tmp_path)


# --- the jobs ----------------------------------------------------------------------------------------

def _trl_yaml(path: Path, model_dir: Path, cohort: Path, cache: Path, **settings) -> Path:
    """A tiny SFT / DPO config: the tiny random Llama, 512 tokens, a checkpoint every step, a constant learning
    rate (so the resumed step moves the weights: a decayed schedule ends at 0 and is saved so)."""
    values = dict(cohort_dir=str(cohort), teacher_cache_dir=str(cache), eval_users=0, threads=1,
                  model_name_or_path=str(model_dir), dtype="float32", use_peft=True, lora_r=4, lora_alpha=8,
                  lora_target_modules=["q_proj", "v_proj"], lora_task_type="CAUSAL_LM", use_cpu=True, bf16=False,
                  gradient_checkpointing=False, max_length=512, learning_rate=1e-3, lr_scheduler_type="constant",
                  gradient_accumulation_steps=1, logging_steps=1, eval_strategy="no", save_strategy="steps",
                  save_steps=1, report_to="none", seed=0, dataloader_num_workers=0)
    values.update(settings)
    path.write_text(yaml.safe_dump(values))
    return path


def _complete_args(work: Path) -> list[str]:
    """complete_nj.yaml, tiny, without choosing the prior on val (seconds per run)."""
    config = yaml.safe_load((ROOT / "recipes" / "configs" / "complete_nj.yaml").read_text())
    config |= {"prior_damping_grid": [], "prior_shrinkage_grid": []}
    (work / "complete.yaml").write_text(yaml.safe_dump(config))
    return ["--config", str(work / "complete.yaml"), "--data_path", str(NJ), "--preset", "tiny", "--patch_size", "4",
            "2", "2", "--d", "8", "--bank_size", "16", "--diffusion_steps", "20", "--batch_size", "8", "--n_samples",
            "2", "--sampler_steps", "3", "--max_entities", "6", "--threads", "1", "--checkpoint_every", "2"]


def jobs(work: Path, model_dir: Path, cohort: Path, cache: Path, processes: int) -> list[dict]:
    """The 2-process jobs (first runs, resumes), or the 1-process reference with the same global batch."""
    per_device = 2 // processes  # global batch 2 for SFT and DPO
    sft = _trl_yaml(work / f"sft{processes}.yaml", model_dir, cohort, cache, completion_only_loss=True,
                    per_device_train_batch_size=per_device)
    dpo = _trl_yaml(work / f"dpo{processes}.yaml", model_dir, cohort, cache, beta=0.1, eval_pairs=0,
                    per_device_train_batch_size=per_device, per_device_eval_batch_size=1, learning_rate=1e-4)
    out = work / f"p{processes}"
    sft_out = ["--output_dir", str(out / "sft")]
    dpo_args = ["--config", str(dpo), "--sft_adapter", str(out / "sft"), "--output_dir", str(out / "dpo")]
    complete = ["train", *_complete_args(work), "--output_dir", str(out / "complete")]
    if processes == 1:
        todo = [("sft", "sft", ["--config", str(sft), *sft_out, "--max_steps", "1", "--save_strategy", "no"]),
                ("dpo", "dpo", [*dpo_args, "--max_steps", "1", "--save_strategy", "no"]),
                ("complete_straight", "complete", [*complete, "--steps", "4", "--calibrate", "false"])]
    else:
        # completion first: completion.train.distributed starts the process group (accelerate later reuses it)
        todo = [("complete", "complete", [*complete, "--steps", "2"]),  # and calibrates, on rank 0
                ("complete_resume", "complete", [*complete, "--steps", "4", "--calibrate", "false"]),
                ("complete_straight", "complete", [*complete[:-1], str(out / "straight"), "--steps", "4",
                                                   "--calibrate", "false"]),
                ("sft", "sft", ["--config", str(sft), *sft_out, "--max_steps", "1"]),
                ("sft_resume", "sft", ["--config", str(sft), *sft_out, "--max_steps", "2"]),
                ("dpo", "dpo", [*dpo_args, "--max_steps", "1"]),
                ("dpo_resume", "dpo", [*dpo_args, "--max_steps", "2"])]
    if not NJ.exists():
        todo = [t for t in todo if t[1] != "complete"]
    return [{"name": name, "stage": stage, "argv": argv} for name, stage, argv in todo]


def launch(work: Path, name: str, job_list: list[dict], processes: int) -> Path:
    records = work / f"records{processes}"
    records.mkdir()
    spec = work / f"{name}.json"
    spec.write_text(json.dumps({"records": str(records), "jobs": job_list}))
    if processes == 1:
        command = [sys.executable, str(WORKER), str(spec)]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        command = [accelerate, "launch", "--config_file", str(DDP), "--num_processes", str(processes),
                   "--main_process_port", "0", str(WORKER), str(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-6000:]}"
    return records


def launch_all(work: Path, cohort: Path, model_dir: Path) -> dict:
    """The 1-process reference, then the 2-process jobs (one after the other, so the timings are fair)."""
    cache = work / "teacher_cache"
    build_corpus(data_args(cohort, cache))  # every rank reads the teacher profiles, none writes them
    found = {}
    for processes in (1, 2):
        job_list = jobs(work, model_dir, cohort, cache, processes)
        records = launch(work, f"launch{processes}", job_list, processes)
        found[processes] = {job["name"]: [json.loads((records / f"{job['name']}.rank{r}.json").read_text())
                                          for r in range(processes)] for job in job_list}
    return found


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, small_cohort, tiny_model_dir):  # noqa: F811
    """Records of the 1-process reference and the 2-process jobs: ``runs[processes][job][rank]``. Launched
    once per session: under pytest-xdist the first worker launches, the others wait for its records."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if hasattr(request.config, "workerinput") else root  # xdist: the workers' common folder
    work, done = root / "multiprocess", root / "multiprocess.json"
    with FileLock(str(root / "multiprocess.lock")):
        if not done.exists():
            work.mkdir()
            try:
                found = {"work": str(work), **launch_all(work, small_cohort, tiny_model_dir)}
            except (AssertionError, subprocess.TimeoutExpired) as err:
                found = {"error": str(err)}
            done.write_text(json.dumps(found))
    found = json.loads(done.read_text())
    if "error" in found:
        pytest.fail(found["error"], pytrace=False)
    return {1: found["1"], 2: found["2"], "work": Path(found["work"])}


def _need(runs, job):
    if job not in runs[2]:
        shared_data("uomo-nj/nj_traffic_users_64.npz")  # skipped without the file (a failure under CI)
    return runs[2][job]


# --- SFT and DPO ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trl_ranks_hold_the_same_weights_and_train_on_their_own_shards(runs, stage):
    ranks = runs[2][stage]
    assert [r["world"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [1, 1]
    assert ranks[0]["weights"] == ranks[1]["weights"], "the ranks' LoRA weights differ after the step"
    (a,), (b,) = ranks[0]["samples"], ranks[1]["samples"]
    assert len(a) == len(b) == 1 and -1 not in a + b, f"one known row per rank, got {a} and {b}"
    assert a != b, f"both ranks trained on row {a}"
    assert sorted(a + b) == sorted(runs[1][stage][0]["samples"][0]), "the shards are not the global batch"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trl_only_rank_0_writes_the_checkpoint(runs, stage):
    rank0, rank1 = (set(r["writes"]) for r in runs[2][stage])
    assert {"checkpoint-1/adapter_model.safetensors", "checkpoint-1/optimizer.pt",
            "checkpoint-1/trainer_state.json", "checkpoint-1/rng_state_0.pth"} <= rank0
    assert {w for w in rank0 | rank1 if w.startswith("checkpoint-1/rng_state_1")} <= rank1 - rank0
    assert {w for w in rank1 if w.startswith("checkpoint-")} == {"checkpoint-1/rng_state_1.pth"}  # HF: its RNG
    assert {"adapter_model.safetensors", "README.md"} <= rank0  # the final adapter and model card
    check_adapter(runs["work"] / "p2" / stage)
    check_adapter(runs["work"] / "p2" / stage / "checkpoint-1")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trl_other_ranks_write_nothing_else(runs, stage):
    rank1 = runs[2][stage][1]["writes"]
    assert [w for w in rank1 if not w.endswith("rng_state_1.pth")] == []


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trl_resume_continues_from_the_checkpoint(runs, stage):
    first, ranks = runs[2][stage], runs[2][f"{stage}_resume"]
    assert [r["result"]["resumed_from"] for r in ranks] == ["checkpoint-1"] * 2
    assert [r["global_step"] for r in ranks] == [2, 2] and [len(r["step_s"]) for r in ranks] == [1, 1]
    assert ranks[0]["weights"] == ranks[1]["weights"] != first[0]["weights"]
    (a,), (b,) = ranks[0]["samples"], ranks[1]["samples"]
    assert len(set(a + b)) == 2 and -1 not in a + b
    assert set(a + b).isdisjoint(first[0]["samples"][0] + first[1]["samples"][0])  # the epoch goes on
    state = json.loads((runs["work"] / "p2" / stage / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert {w for w in ranks[1]["writes"] if w.startswith("checkpoint-")} == {"checkpoint-2/rng_state_1.pth"}


# --- completion ----------------------------------------------------------------------------------

def test_completion_ranks_hold_the_same_weights_and_train_on_their_own_shards(runs):
    ranks = _need(runs, "complete")
    assert ranks[0]["weights"] == ranks[1]["weights"], "model / EMA / U-MASK bank differ between the ranks"
    assert ranks[0]["logs"] == ranks[1]["logs"]  # the logged losses are the means over the ranks
    for a, b in zip(ranks[0]["samples"], ranks[1]["samples"]):
        assert len(a) == len(b) == 4 and a != b  # global batch 8: 4 rows each
    single = runs[1]["complete_straight"][0]["samples"]
    assert ranks[0]["samples"][0] + ranks[1]["samples"][0] == single[0]  # the same first global batch, split


def test_completion_only_rank_0_writes(runs):
    rank0, rank1 = (set(r["writes"]) for r in _need(runs, "complete"))
    assert rank1 == set()
    assert {"checkpoint.safetensors", "args.json"} <= rank0 and any(w.startswith("tb/") for w in rank0)
    assert any(w.startswith("calibration_") for w in rank0)


def test_completion_resume_continues_exactly(runs):
    ranks = _need(runs, "complete_resume")
    assert [r["result"]["steps_run"] for r in ranks] == [2, 2]  # steps 3 and 4, not 4 more
    assert ranks[0]["weights"] == ranks[1]["weights"]
    straight = runs[2]["complete_straight"]
    assert ranks[0]["weights"] == straight[0]["weights"], "2 steps + resume to 4 != 4 steps straight"
    assert ranks[0]["logs"] == straight[0]["logs"][2:]
    with safe_open(str(runs["work"] / "p2" / "complete" / "checkpoint.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == "4"
    assert ranks[1]["writes"] == []


# --- wall time per step, 1 vs 2 processes (reported, not asserted) ----------------------------------

def test_report_step_times(runs):
    rows = [("sft", "sft", "2 sequences"), ("dpo", "dpo", "2 pairs"), ("complete", "complete_straight", "8 entities")]
    lines = ["stage      1 process   2 processes (rank 0 / rank 1)   global batch   [s/step, mean]"]
    for stage, job, batch in rows:
        if job in runs[2]:
            one, (r0, r1) = runs[1][job][0]["step_s"], (r["step_s"] for r in runs[2][job])
            lines.append(f"{stage:<10} {_mean(one):<11} {_mean(r0)} / {_mean(r1):<23} {batch}")
    lines.append("(1 thread per process; SFT / DPO: the first step of a fresh trainer; completion: 4 steps)")
    report = "\n".join(lines)
    (runs["work"] / "step_times.txt").write_text(report + "\n")
    print("\n" + report)


def _mean(times: list[float]) -> str:
    return f"{sum(times) / len(times):.3f}" if times else "-"
