"""One self-contained HTML page per run: the answer first, then every results table and figure, then
the provenance.

`build_report(run_dir, out_dir)` reads what the stages of ``recipes/demo.py`` wrote under
``run_dir`` (``<stage>/stage.json`` records, ``pipeline.json`` statuses, ``timings.json``, each
stage's result files) and writes ``out_dir/index.html`` (figures embedded as base64 PNG, so the file
can be mailed), ``out_dir/report.json`` (the numbers shown) and the figures it draws itself (user
clusters, training curves). The page opens with "Results at a glance" (:func:`section_glance`): the
results at or beyond their floor (:mod:`scope.run.floors`) in red, then one row per capability with
the method, the best baseline, the paired difference with its 95% CI and a verdict; a stage output's
optional ``at_a_glance_note`` (a string, or one per capability) is shown beside its row. Then come
the results sections, and last the provenance (stage timings, versions, YAMLs, commands). Every
section is built independently: a stage that failed, was not run or whose files are missing gives a
clearly labelled "not available: <why>" box (a glance row "not run: <why>"), never an exception.
The page is rendered with the Jinja2 template ``scope/run/templates/report.html.jinja``.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from scope.io import write_json, write_text
from scope.pituning.evaluate import METRIC_KEYS, macro_precision_difference
from scope.run.floors import all_violations
from scope.run.stages import STAGES, stage_folder

log = logging.getLogger(__name__)
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
REPO_ROOT = Path(__file__).resolve().parents[2]   # the folder holding recipes/
TEMPLATE = "report.html.jinja"
USER_LABELS_FILE = "user_labels.csv"  # optional, in a cohort folder: user_id,label (e.g. known groups)


class Missing(Exception):
    """A section's inputs are not there; the message says why (shown to the reader)."""


# --------------------------------------------------------------------------- blocks of a section

@dataclass
class Section:
    id: str
    title: str
    intro: str
    blocks: list[dict] = field(default_factory=list)

    def table(self, rows: list[dict], caption: str, columns: list[str] | None = None, first: str | None = None):
        if not rows:
            return self.missing(f"{caption.split('.')[0]}: no rows")
        columns = columns or list(dict.fromkeys(k for r in rows for k in r))
        self.blocks.append({"kind": "table", "caption": caption, "columns": columns,
                            "rows": [[(fmt(r.get(c)), _numeric(r.get(c))) for c in columns] for r in rows],
                            "first": first})

    def figure(self, path: str | Path, caption: str):
        path = Path(path)
        if not path.exists():
            return self.missing(f"figure {path.name} was not written")
        self.blocks.append({"kind": "figure", "caption": caption, "alt": caption.split(".")[0],
                            "data": base64.b64encode(path.read_bytes()).decode()})

    def text(self, text: str):
        self.blocks.append({"kind": "text", "text": text})

    def code(self, title: str, text: str):
        self.blocks.append({"kind": "code", "title": title, "text": text})

    def missing(self, why: str):
        self.blocks.append({"kind": "missing", "why": why})


def _numeric(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def fmt(value) -> str:
    """Table cell text: 4 significant digits for floats, '–' for None / NaN."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise Missing(f"{path.name} not found in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise Missing(f"{path} is not valid JSON ({err})") from err


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    """The run folder, its stage statuses and records."""

    root: Path
    status: dict[str, dict] = field(default_factory=dict)    # pipeline.json rows by stage
    records: dict[str, dict] = field(default_factory=dict)   # stage.json by stage

    @classmethod
    def open(cls, root: str | Path) -> Run:
        root = Path(root)
        run = cls(root)
        pipeline = root / "pipeline.json"
        if pipeline.exists():
            run.status = {r["stage"]: r for r in json.loads(pipeline.read_text()).get("stages", [])}
        folders = {name: Path(r["folder"]) for name, r in run.status.items()}
        for name, folder in folders.items():
            if (folder / "stage.json").exists():
                run.records[name] = json.loads((folder / "stage.json").read_text())
        if not folders:  # no pipeline.json: take any <stage>/stage.json
            for path in sorted(root.glob("*/stage.json")):
                record = json.loads(path.read_text())
                run.records[record.get("stage", path.parent.name)] = record
        return run

    def why_missing(self, stage: str) -> str:
        """Why a stage's results are absent, in words."""
        row = self.status.get(stage)
        if row is None:
            return f"stage '{stage}' is not part of this run"
        status, detail = row.get("status"), row.get("detail") or ""
        return {"failed": f"stage '{stage}' failed ({detail})",
                "blocked": f"stage '{stage}' did not run: {detail} did not finish",
                "unavailable": f"stage '{stage}' is not available here ({detail})",
                "interrupted": f"stage '{stage}' was interrupted; rerun the main job to resume it",
                "not run": f"stage '{stage}' has not run yet"}.get(status, f"stage '{stage}': {status} {detail}".strip())

    def folder(self, stage: str) -> Path:
        """Where ``stage`` wrote: as the pipeline recorded it, else its folder in :data:`STAGES`."""
        row = self.status.get(stage)
        return Path(row["folder"]) if row else stage_folder(self.root, stage)

    def output(self, stage: str) -> Path:
        """The file that marks ``stage`` done (:data:`STAGES`)."""
        return self.folder(stage) / STAGES[stage][1]


def guarded(run: Run, section: Section, stage: str, build: Callable[[Section], None]) -> Section:
    """Run ``build``; a Missing input or any error becomes a 'not available' box naming the reason."""
    try:
        build(section)
    except Missing as err:
        why = run.why_missing(stage) if run.status.get(stage, {}).get("status") not in ("done", "skipped", "recorded") \
            else str(err)
        section.missing(why if stage in run.status else str(err))
    except Exception as err:  # noqa: BLE001 - a broken result file must not break the whole report
        log.exception("report section %s", section.id)
        section.missing(f"could not read the results of stage '{stage}': {type(err).__name__}: {err}")
    return section


# --------------------------------------------------------------------------- sections

def _timing_rows(run: Run) -> tuple[list[dict], str]:
    """Per-stage timings from ``timings.json`` (the runner's own record) if present, else ``pipeline.json``
    and the stage records; and a sentence on the whole job."""
    try:
        timings = read_json(run.root / "timings.json")
    except Missing:
        timings = None
    if isinstance(timings, dict):
        rows = [{"stage": r.get("stage"), "what it does": run.status.get(r.get("stage"), {}).get("description", ""),
                 "status": r.get("status"), "wall time (s)": r.get("wall_s"), "CPU time (s)": r.get("cpu_s"),
                 "peak memory (MB)": r.get("peak_rss_mb")} for r in timings.get("stages", [])]
        total = timings.get("total_wall_s")
        return rows, (f"The whole job took {fmt(total / 60 if isinstance(total, (int, float)) else None)} min of wall "
                      f"time, from {timings.get('started_at', '?')} to {timings.get('finished_at', '?')} (timings.json).")
    rows = []
    for name, row in run.status.items():
        record = run.records.get(name, {})
        pick = {key: next((d[key] for d in (row, record) if d.get(key) is not None), None)
                for key in ("wall_s", "cpu_s", "peak_rss_mb")}
        rows.append({"stage": name, "what it does": row.get("description", ""), "status": row.get("status"),
                     "wall time (s)": pick["wall_s"], "CPU time (s)": pick["cpu_s"], "peak memory (MB)": pick["peak_rss_mb"],
                     "finished at (UTC)": record.get("finished_at", "–")})
    if not rows:
        rows = [{"stage": n, "status": "recorded", "wall time (s)": r.get("wall_s"),
                 "peak memory (MB)": r.get("peak_rss_mb"), "finished at (UTC)": r.get("finished_at")}
                for n, r in run.records.items()]
    total = sum(r["wall time (s)"] for r in rows if isinstance(r.get("wall time (s)"), (int, float)))
    return rows, f"Total recorded wall time {total / 60:.1f} min (pipeline.json; no timings.json in this run)."


def section_run(run: Run, config_text: str | None) -> Section:
    s = Section("run", "Provenance: what was run, with which software and settings",
                "Each stage ran as its own process; a stage whose inputs and configuration did not change since its "
                "last success was skipped and shows its recorded time.")
    s.text(f"Run folder {run.root.resolve()}.")
    rows, total = _timing_rows(run)
    s.table(rows, "Stages in order: status (done = ran now, skipped = up to date, failed / blocked / unavailable = "
                  "see the section's box), wall time, CPU time (user + system, all threads: the work done, whatever the machine's "
                  "load) and the peak resident memory of the stage's process tree.",
            first="stage")
    peaks = [r["peak memory (MB)"] for r in rows if isinstance(r.get("peak memory (MB)"), (int, float))]
    s.text(f"{total} Largest peak memory {max(peaks or [0]):,.0f} MB.")
    record = next(iter(run.records.values()), None)
    if record:
        versions = {**record.get("versions", {}), "python": record.get("python"), "git commit": record.get("git_commit"),
                    "platform": record.get("platform"), "CPU cores": record.get("cpu_count")}
        s.table([{"package": k, "version": v} for k, v in versions.items()],
                "Software versions recorded by the stages (package versions, the git commit of the code, the machine).",
                first="package")
    if config_text:
        s.code("main job configuration (recipes/configs/demo.yaml)", config_text)
    allowed = (REPO_ROOT, run.root.resolve())
    for name, record in run.records.items():
        for path in record.get("configs", {}):
            resolved = Path(path).resolve()
            if not any(resolved.is_relative_to(folder) for folder in allowed):
                s.text(f"{name}: configuration {path} was not embedded: it is outside both the repository "
                       f"and the run folder.")
            elif resolved.is_file():
                s.code(f"{name}: {resolved.name}", resolved.read_text())
        if record.get("commands"):
            s.code(f"{name}: command(s)", "\n".join(record["commands"]))
    return s


def section_cohort(run: Run) -> Section:
    try:
        source = read_json(run.output("cohort")).get("source")
    except Missing:
        source = None
    s = Section("cohort", "The cohort",
                f"Your cohort, read in place from {source} through the validating loader and cut into behaviour "
                "tensors (it has no simulator ground truth, so the per-group figures show all users as one group)."
                if source else
                "The embedded default: a seeded simulator writes a cohort of smartphone users (personas such as "
                "commuter or student) in the real Tsinghua App Usage format, which is read back through the validating "
                "loader and cut into behaviour tensors.")

    def build(s: Section):
        folder = run.folder("summary")
        summary = read_json(run.output("summary"))
        rows = [{"quantity": "users", "value": summary.get("users")},
                {"quantity": "app-usage records", "value": summary.get("events")},
                {"quantity": "days", "value": summary.get("days")},
                {"quantity": "records per user (p10 / median / p90)", "value": summary.get("events_per_user")},
                {"quantity": "behaviour tensors (windows)", "value": summary.get("windows")},
                {"quantity": "tensor shape C x T x H x W", "value": summary.get("tensor_shape")},
                {"quantity": "users per split", "value": summary.get("split_users")},
                {"quantity": "records outside the spatial layout", "value": summary.get("events_outside_layout")}]
        s.table(rows, "Size of the cohort and of its tensors (C = 20 app categories + presence + traffic, T = 192 "
                      "quarter-hours = two days, H x W = the user's 16 most visited places).", first="quantity")
        if summary.get("groups"):
            s.table([{"persona": k, "users": v} for k, v in summary["groups"].items()],
                    "Users per simulated persona (the ground truth the profiles and embeddings should recover).")
        s.figure(folder / "activity_by_group.png", "Hour-of-day activity per persona: when each kind of user uses the phone.")
        s.figure(folder / "apps_by_group.png", "App categories per persona: what each kind of user does on the phone.")
        s.figure(folder / "example_tensor.png", "One behaviour tensor: app-category usage, presence and traffic over "
                                                "two days and the user's places.")
    return guarded(run, s, "summary", build)


def _with_ci(value: dict, signed: bool = False) -> str:
    """``{"mean", "ci95"}`` as ``0.812 [0.70, 0.91]``."""
    sign = "+" if signed else ""
    return f"{value['mean']:{sign}.3f} [{value['ci95'][0]:{sign}.2f}, {value['ci95'][1]:{sign}.2f}]"


def section_student(run: Run) -> Section:
    s = Section("student", "U-SCOPE: the profile student (SFT, DPO)",
                "A small language model (the student) learns to answer a user's usage statistics with reasoning and a "
                "structured profile; it is distilled from a teacher (SFT) and then aligned with preference pairs (DPO).")

    def build_eval(s: Section):
        result = read_json(run.output("evaluate"))
        rows = result["stages"]
        s.text(f"Teacher: {result.get('teacher', 'not recorded')}.")
        for decoding in result["decodings"]:
            table = [{"student": name, "users": r["users"], "users/s": r[decoding]["users_per_s"],
                      "cut off": r[decoding]["cut_off"],
                      **{k: _with_ci(r[decoding][k]) for k in ("schema_valid", "field_agreement", "grounding@3")}}
                     for name, r in rows.items() if decoding in r]
            skipped = [name for name, r in rows.items() if decoding not in r]
            if skipped:
                s.text(f"Not run: the {decoding} decoding of {', '.join(skipped)} (the evaluate stage's "
                       f"constrained_stages leaves it out).")
            if not table:
                continue
            s.table(table, f"Student evaluation on held-out users, {decoding} decoding (mean [bootstrap 95% CI]): "
                           "share of answers that are a valid profile (schema_valid), agreement of its fields with the "
                           "teacher's, and whether its top-3 apps and places are the user's real top-3 (grounding@3); "
                           "higher is better." + (" Constrained decoding is what a user gets." if decoding == "constrained"
                                                  else " Unconstrained decoding is what the student learnt."),
                    first="student")
        if "teacher_scores" in result:
            t = result["teacher_scores"]
            s.text(f"The teacher's own profiles on the same users: schema_valid {_with_ci(t['schema_valid'])}, "
                   f"grounding@3 {_with_ci(t['grounding@3'])}.")
        for decoding, effect in result.get("dpo_effect", {}).items():
            s.text(f"DPO effect ({decoding}): {effect['changed_share']:.0%} of the held-out answers changed; "
                   f"after DPO minus after SFT, grounding@3 {_with_ci(effect['grounding@3'], signed=True)}, "
                   f"field agreement {_with_ci(effect['field_agreement'], signed=True)}.")

    def build_novelty(s: Section):
        result = read_json(run.output("novelty"))
        cols = ("apps_hit@3", "places_hit@3", "intents_hit@3", "mean_hit@3")
        s.table([{"method": name, "cases": m["cases"], **{c: _with_ci(m[c]) for c in cols}}
                 for name, m in result["methods"].items()],
                f"Cold-start / novelty recommendation (paper section 7.5): {result['cases']} cases of {result['users']} "
                f"held-out users (cuts: {', '.join(result['cuts'])}; excluded {result['excluded']}). hit@3 = one of the "
                "3 recommended app categories / places / intents the user had not used is taken up in the hidden part; "
                f"mean [bootstrap 95% CI]; the student decodes {result['decoding']}.", first="method")
        if "dpo_effect" in result:
            effect = result["dpo_effect"]
            s.text(f"DPO effect on recommendations: {effect['changed_share']:.0%} of the answers changed; after DPO "
                   f"minus after SFT, mean hit@3 {_with_ci(effect['mean_hit@3'], signed=True)}.")

    def build_dpo(s: Section):
        m = read_json(run.folder("dpo") / "metrics.json")
        keys = ["pairs", "pairs_by_kind", "beta", "train_reward_accuracy", "train_reward_margin", "train_loss",
                "heldout_pairs", "heldout_reward_accuracy", "heldout_reward_margin", "heldout_loss", "wall_s"]
        s.table([{"metric": k, "value": m.get(k)} for k in keys if k in m],
                "DPO: reward accuracy is the share of preference pairs where the aligned student prefers the grounded "
                "profile over the rejected one (0.5 = chance); the margin is how much more (in beta-scaled log-probability).",
                first="metric")

    def build_sft(s: Section):
        m = read_json(run.folder("sft") / "metrics.json")
        keys = ["train_users", "teacher", "teacher_failures", "train_loss", "train_runtime", "resumed_from", "wall_s"]
        s.table([{"metric": k, "value": m.get(k)} for k in keys if k in m],
                "SFT run: users the teacher profiled for training, the teacher, and the final training loss.",
                first="metric")

    guarded(run, s, "evaluate", build_eval)
    guarded(run, s, "novelty", build_novelty)
    guarded(run, s, "dpo", build_dpo)
    guarded(run, s, "sft", build_sft)
    return s


def section_synthesis(run: Run) -> Section:
    s = Section("synthesis", "U-SCOPE: synthetic cohort and its fidelity",
                "A trace language model fine-tuned on the real users' app-location sequences generates synthetic users "
                "under constrained decoding; fidelity compares the synthetic and the real app-location co-occurrence "
                "(paper Fig. 5: R² = 0.906, r = 0.952), and utility trains a predictor on synthetic data and tests it on "
                "real users (TSTR) against training on real data (TRTR).")

    def build(s: Section):
        f = read_json(run.output("synthesis"))
        folder = run.output("synthesis").parent
        scalars = {k: v for k, v in f.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        first = ["pearson_r", "r2", "mae", "rmse", "tstr_accuracy", "trtr_accuracy", "majority_accuracy"]
        keys = [k for k in first if k in scalars] + [k for k in scalars if k not in first]
        s.table([{"metric": k, "value": scalars[k]} for k in keys],
                "Fidelity of the synthetic cohort: Pearson r and R² of the app-location co-occurrence (1 = identical), "
                "its MAE / RMSE, Jensen-Shannon divergences of the marginals (0 = identical), and next-category accuracy "
                "of a model trained on synthetic (TSTR) vs real (TRTR) traces, both tested on real users.", first="metric")
        nested = {k: v for k, v in f.items() if isinstance(v, dict)}
        for key, value in nested.items():
            flat = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
            if flat:
                s.table([{"metric": k, "value": v} for k, v in flat.items()], f"{key}: details from fidelity.json.",
                        first="metric")
        pngs = sorted(folder.glob("*.png"))
        if not pngs:
            s.missing("the synthesis report wrote no figures")
        for png in pngs:
            name = png.stem.replace("_", " ")
            caption = ("Difference heatmap of the app-location co-occurrence, synthetic minus real (white = equal)."
                       if "heat" in png.stem else
                       "Each point is one (app category, location cluster) pair: real vs synthetic co-occurrence; "
                       "the diagonal is perfect fidelity." if "scatter" in png.stem else f"{name}.")
            s.figure(png, caption)
    return guarded(run, s, "synthesis", build)


def section_embeddings(run: Run, out_dir: Path) -> tuple[Section, dict]:
    s = Section("embeddings", "U-SCOPE: user embeddings h_u",
                "Each user's profile text is encoded by a frozen Sentence-BERT (the embed stage); the completion model's "
                "entity MLP standardises that encoding and maps it to h_u (Eq. 24), trained with U-MASK and the DiT. "
                "It is the only user-specific input of the completion model.")
    figures: dict = {}

    def build(s: Section):
        import pandas as pd

        from scope.data.simulate import read_ground_truth
        from scope.profiles.embedding import PROFILES_FILE, load_user_embeddings
        from scope.run.figures import user_cluster_figure

        path = run.output("embed")
        if not path.exists():
            raise Missing(f"{path.name} not found")
        users, h = load_user_embeddings(path)
        try:
            cohort = Path(read_json(run.output("cohort")).get("source") or run.folder("cohort"))
        except Missing:
            cohort = run.folder("cohort")
        if (cohort / USER_LABELS_FILE).exists():  # labels the user supplied: user_id,label
            given = pd.read_csv(cohort / USER_LABELS_FILE).set_index("user_id")["label"]
            labels = [str(given.get(int(u), "unlabelled")) for u in users]
            what, coloured_by = "your label", f"the labels of {USER_LABELS_FILE}"
        else:
            try:
                persona = read_ground_truth(cohort)["persona"]
                labels = [str(persona.get(int(u), "unknown")) for u in users]
                what, coloured_by = "simulated persona", "the persona the simulator gave them"
            except FileNotFoundError:  # a real cohort: colour by the personas the profiles name
                profiles = pd.read_parquet(path.parent / PROFILES_FILE).set_index("user_id")["profile_json"]
                labels = [json.loads(profiles[int(u)]).get("persona", "unknown") if int(u) in profiles.index
                          else "unknown" for u in users]
                what, coloured_by = "profile persona", "the persona their profile names (no simulator ground truth)"
        figures["user_clusters"] = user_cluster_figure(h, labels, out_dir / "user_clusters.png",
                                                       title=f"profile encodings of {len(users)} users by {what}")
        s.figure(out_dir / "user_clusters.png",
                 "User clusters: the users' frozen profile encodings projected on their two main directions (PCA), coloured by "
                 f"{coloured_by}; well separated colours mean the profiles capture who the user is "
                 "(silhouette in the title: 1 = perfectly separated, 0 = no structure). The profile text names the "
                 "persona, so separation by persona is partly circular; the probe below is not.")
    guarded(run, s, "embed", build)

    def build_probe(s: Section):
        probe = read_json(run.output("compare")).get("embedding_probe") if run.output("compare").exists() else None
        if not probe:  # no user embeddings, or an older compare stage: the clusters stand alone
            return
        s.table([{"features": name, "R2 channel means": probe[name]["main"], "R2 all statistics": probe[name]["all"]}
                 for name in ("sbert", "h_u")],
                f"Does the embedding encode behaviour? Held-out R² of a ridge probe from each user's frozen SBERT "
                f"encoding, and from the engine's trained h_u, to the user's statistics in the {probe['held_out_users']} "
                f"evaluated users' windows (per-channel means; and per channel x quarter of the day, per place), fitted "
                f"on {probe['train_users']} train users. 0 = no better than the train mean. Here the profiles saw those "
                "windows; the benchmark's probe (below) scores a week the profiles never saw.", first="features")
        users = benchmark_figures("completion_users")
        if "probe_r2" in users:
            s.text("Benchmark (completion_users, 500 users, week-2 statistics, profiles from week 1): R² channel means "
                   f"SBERT {users['probe_r2']['sbert']['main']:.3f}, h_u {users['probe_r2']['h_u']['main']:.3f}.")
    guarded(run, s, "compare", build_probe)
    return s, figures


NAV = {"at-a-glance": "At a glance", "cohort": "Cohort", "student": "Student (SFT, DPO)", "synthesis": "Synthesis",
       "embeddings": "User clusters", "completion": "Completion vs baselines", "pituning": "PITuning vs LightGBM",
       "curves": "Training curves", "run": "Provenance"}
COMPARE_COLUMNS = ["method", "rmse_norm", "mae_norm", "rmse_apps", "mae_apps", "rmse_orig", "mae_orig", "recall@3",
                   "ndcg@3"]
TASK_TEXT = {
    "short": "Short-term prediction (the next hour, 4 quarter-hours) on test users.",
    "long": "Long-horizon forecasting (the next day, 96 quarter-hours) on test users.",
    "cold": "Cold-start: users never seen in training, with only a few revealed entries; recall / NDCG @3 rank the "
            "app categories the user actually used.",
}


def section_completion(run: Run, out_dir: Path) -> tuple[Section, dict]:
    s = Section("completion", "U-MASK + DiT: completing behaviour tensors vs baselines",
                "One diffusion transformer completes each user's behaviour tensor from evidence chosen per user and task "
                "by U-MASK, as a residual over a deterministic prior (interpolation / damped persistence of that "
                "evidence); every baseline reads the whole available history. Errors are on the hidden target entries "
                "only: *_norm in standardised log units (mean over channels), *_apps in app records per quarter-hour (mean over "
                "app categories; *_orig where no app channels exist); lower is better.")
    curves: dict = {}

    def build_compare(s: Section):
        report = read_json(run.output("compare"))
        if report.get("headline"):
            s.text(f"In short: {report['headline']}")
        for task, rows in report.get("tasks", {}).items():
            if not rows:
                s.missing(f"{task}: no users in the evaluated split")
                continue
            table = [{"method": m, **{k: v for k, v in r.items() if not isinstance(v, list)}} for m, r in rows.items()]
            best = min(rows, key=lambda m: rows[m].get("rmse_norm", float("inf")))
            s.table(table, f"{TASK_TEXT.get(task, task)} Best RMSE: {best}.",
                    columns=[c for c in COMPARE_COLUMNS if any(c in r for r in table)], first="method")
        for method, why in report.get("skipped", {}).items():
            s.text(f"{method} was not scored: {why}")
        conditioning = benchmark_figures("completion_users").get("conditioning")
        if conditioning and all(isinstance(v, dict) and "rmse" in v for rows in conditioning.values()
                                for v in rows.values()):
            s.table([{"conditioning": c, **{t: f"{v['rmse']:.4f} ± {v['std']:.4f}" for t, v in rows.items()}}
                     for c, rows in conditioning.items()],
                    "Conditioning controls (benchmark completion_users: 500 users, normalised RMSE, mean ± std over "
                    f"seeds; {BENCHMARK_README}): the engine with h_u; trained without any user vector (none); every "
                    "user read as the cohort mean (mean); vectors permuted across users (shuffled); the user's week-1 "
                    "statistics in place of h_u (oracle_stats). The demo's own mean / shuffled rows are in the tables "
                    "above.", first="conditioning")

    def build_figures(s: Section):
        folder = run.folder("completion")
        if not run.output("completion").exists():
            raise Missing(f"{run.output('completion').name} not found")
        s.figure(folder / "figures" / "masks_tensors_test.png",
                 "Masks per task (paper Fig. 8): for each task, which time slots and places U-MASK reveals as evidence "
                 "(share of users), the joint time x place mask, and how concentrated the mask values are.")
        s.figure(folder / "figures" / "fpat_tensors_test.png",
                 "Behaviour patterns (paper Fig. 9): the users' pattern features F_pat in 2-D, coloured by soft group and "
                 "by the share of their history U-MASK reveals.")
        from scope.run.figures import read_scalars
        scalars = read_scalars(folder / "tb")
        curves["U-MASK + DiT"] = {t.split("/", 1)[-1]: v for t, v in scalars.items()}

    guarded(run, s, "compare", build_compare)
    guarded(run, s, "completion", build_figures)
    return s, curves


def section_pituning(run: Run) -> Section:
    s = Section("pituning", "PITuning: on-device intent prediction vs LightGBM",
                "A pretrained language model tuned on the population is distilled into a small student, which forgets "
                "intents irrelevant to a user (unlearning) and is fine-tuned per user; LightGBM on hand-made features is "
                "the paper's baseline. Weighted (w) and macro (m) precision / recall and NDCG@3/5 over the individual "
                "users' test points; higher is better.")
    keys = list(METRIC_KEYS)

    def build(s: Section):
        rows = []
        report = read_json(run.output("pituning"))
        rows += [{"method": m, **{k: v.get(k) for k in keys}} for m, v in report.get("metrics", {}).items()]
        try:
            lgb = read_json(run.output("lightgbm"))
            rows += [{"method": m, **{k: v.get(k) for k in keys}} for m, v in lgb.get("metrics", {}).items()]
        except Missing:
            s.missing(run.why_missing("lightgbm") if run.status.get("lightgbm", {}).get("status") not in
                      ("done", "skipped", "recorded") else "lightgbm.json not found")
        s.table(rows, "PITuning and its intermediate models against LightGBM per user and pooled.",
                columns=["method", *keys], first="method")
        ms = report.get("student_ms_per_prediction") or {}
        agree = report.get("onnx_top1_agreement") or {}
        s.text(f"Student: {fmt(report.get('student_params'))} parameters, {fmt(report.get('student_file_mb'))} MB per user; "
               f"ms per prediction on one CPU thread: eager PyTorch {fmt(ms.get('eager'))}, ONNX Runtime "
               f"{fmt(ms.get('onnx'))}, int8 {fmt(ms.get('onnx_int8'))}; top-1 agreement with eager: ONNX "
               f"{fmt(agree.get('fp32'))}, int8 {fmt(agree.get('int8'))}. Population model on the held-out population "
               f"validation users: prec_m {fmt((report.get('teacher_population_val') or {}).get('prec_m'))}.")
    return guarded(run, s, "pituning", build)


def section_curves(run: Run, out_dir: Path, completion_curves: dict) -> Section:
    s = Section("curves", "Training curves",
                "Loss (and for DPO, reward accuracy / margin) per optimisation step of each trained model, from its "
                "TensorBoard log.")
    from scope.run.figures import read_scalars, training_curves_figure

    curves = {}
    wanted = {"sft": ("train/loss", "train/mean_token_accuracy"),
              "dpo": ("train/loss", "train/rewards/accuracies", "train/rewards/margins")}
    for stage, tags in wanted.items():
        folder = run.folder(stage)
        scalars = read_scalars(folder / "runs") if (folder / "runs").exists() else {}
        picked = {t.split("/", 1)[-1]: scalars[t] for t in tags if t in scalars}
        if picked:
            curves[stage.upper()] = picked
    curves.update({k: {t: v for t, v in c.items() if t in ("loss", "L_rec", "rho")} for k, c in completion_curves.items()})
    path = training_curves_figure(curves, out_dir / "training_curves.png")
    if path is None:
        s.missing("no training logs found (the SFT, DPO and completion stages have not run)")
    else:
        s.figure(path, "Training curves: each panel is one model's logged quantity against the optimisation step "
                       "(a falling loss means the model is learning; rho is U-MASK's evidence budget).")
    return s


# --------------------------------------------------------------------------- results at a glance

def verdict(ci95, higher_is_better: bool = True) -> str:
    """better / worse when the 95% CI of method minus baseline excludes 0 (on the good / bad side), else tie."""
    lo, hi = ci95
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "no CI"
    if lo > 0 or hi < 0:
        return "better" if (lo > 0) == higher_is_better else "worse"
    return "tie"


def _signed(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def _row(capability: str, metric: str, method: str, value, baseline: str, baseline_value, difference: dict,
         higher_is_better: bool, source: dict, benchmark: str | None = None) -> dict:
    """One row of the glance table; ``difference`` is method minus baseline ``{"mean", "ci95"}``; the note is
    the stage output's ``at_a_glance_note`` (a string, or one per capability), then ``benchmark``: what the
    capability's benchmark measured at its size (:func:`benchmark_notes`)."""
    note = source.get("at_a_glance_note")
    note = note.get(capability) if isinstance(note, dict) else note
    return {"capability": capability, "metric": f"{metric} ({'higher' if higher_is_better else 'lower'} is better)",
            "method": method, "value": fmt(value), "baseline": baseline, "baseline_value": fmt(baseline_value),
            "difference": _signed(difference), "verdict": verdict(difference["ci95"], higher_is_better),
            "note": " ".join(n for n in (note, benchmark) if n) or None}


BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
BENCHMARK_README = "benchmarks/README.md"


def _ci(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def benchmark_figures(name: str, folder: Path = BENCHMARK_RESULTS) -> dict:
    """The figures of one benchmark (``benchmarks/results/<name>.json``; {} when it was never run)."""
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def benchmark_notes(folder: Path = BENCHMARK_RESULTS, cold_split: str = "cold") -> dict[str, str]:
    """Per glance capability, the figure of its benchmark (``benchmarks/results/<name>.json``, measured at a size
    the demo cannot afford) to read beside the demo's: the demo's verdict may differ, and says so here. Only
    capabilities whose results file exists get a note."""
    notes = {}
    uscope = benchmark_figures("uscope_eval", folder)
    if "dpo_effect" in uscope:
        notes["DPO"] = (f"Benchmark ({uscope['settings']['eval_users']} held-out users; uscope_eval in {BENCHMARK_README}): "
                        f"after DPO minus after SFT {_ci(uscope['dpo_effect']['novelty_mean_hit@3'])} novelty mean hit@3 "
                        f"(CI over its {uscope['dpo_effect']['novelty_mean_hit@3'].get('n', '?')} cases).")
    if "novelty" in uscope:
        hit = {m: uscope["novelty"][m]["mean"]["mean"] for m in ("student after DPO", "kNN (statistics)", "popularity")}
        notes["novelty recommendation"] = ("Benchmark (uscope_eval) mean hit@3: " + ", ".join(f"{m} {v:.3f}"
                                                                                           for m, v in hit.items()) + ".")
    pituning = benchmark_figures("pituning", folder)
    if "methods" in pituning:
        m = pituning["methods"]
        notes["PITuning"] = (f"Benchmark (pituning in {BENCHMARK_README}, 3 seeds): prec_m PITuning "
                             f"{m['pituning']['prec_m']['mean']:.3f}, from-scratch transformer {m['scratch_transformer']['prec_m']['mean']:.3f}, "
                             f"LightGBM pooled {m['lightgbm_pooled']['prec_m']['mean']:.3f}; the demo has fewer users and days.")
    users = benchmark_figures("completion_users", folder)
    for task in ("short", "long", "cold"):
        if f"engine_vs_best_baseline_{task}" in users:
            notes[f"completion: {task}"] = (
                f"Benchmark (per-user tensors, 3 seeds; completion_users in {BENCHMARK_README}): engine "
                f"{100 * users[f'engine_vs_best_baseline_{task}']:+.1f}% RMSE gain over its best baseline "
                f"({users[f'best_baseline_{task}']}).")
    if cold_split == "cold":
        notes["completion: cold"] = ("The demo's cold users are those with the fewest events (tensorize's "
                                     "cold_start_max_events): almost all zeros, where carrying 4 revealed entries is "
                                     "hard to beat; the benchmark's cold task reveals 4 entries of ordinary unseen users. "
                                     + notes.get("completion: cold", "")).strip()
    return notes


def _glance_profiles(run: Run) -> list[dict]:
    result = read_json(run.output("evaluate"))
    if "vs_teacher" not in result:
        raise Missing("evaluation.json has no paired comparison with the teacher (vs_teacher): rerun the evaluate stage")
    vs = result["vs_teacher"]
    student = result["stages"][vs["stage"]][vs["decoding"]]
    return [_row(f"profiles: {m}", m, f"student {vs['stage']}, {vs['decoding']} decoding", student[m]["mean"],
                 f"teacher ({result.get('teacher', '?')})", result["teacher_scores"][m]["mean"], vs[m], True, result)
            for m in ("schema_valid", "grounding@3")]


def _glance_dpo(run: Run) -> list[dict]:
    result = read_json(run.output("novelty"))
    if "dpo_effect" not in result:
        raise Missing("the novelty stage scored no student both after SFT and after DPO")
    methods = result["methods"]
    return [_row("DPO", "novelty mean hit@3", "student after DPO", methods["student after DPO"]["mean_hit@3"]["mean"],
                 "student after SFT", methods["student after SFT"]["mean_hit@3"]["mean"],
                 result["dpo_effect"]["mean_hit@3"], True, result, benchmark_notes().get("DPO"))]


def _glance_novelty(run: Run) -> list[dict]:
    result = read_json(run.output("novelty"))
    if "vs_baselines" not in result:
        raise Missing("novelty.json has no paired comparison with the baselines (vs_baselines): rerun the novelty stage")
    methods, vs = result["methods"], result["vs_baselines"]
    best = max(vs["mean_hit@3"], key=lambda b: methods[b]["mean_hit@3"]["mean"])
    return [_row("novelty recommendation", "mean hit@3", vs["student"], methods[vs["student"]]["mean_hit@3"]["mean"],
                 best, methods[best]["mean_hit@3"]["mean"], vs["mean_hit@3"][best], True, result,
                 benchmark_notes().get("novelty recommendation"))]


def _glance_synthesis(run: Run) -> list[dict]:
    result = read_json(run.output("synthesis"))
    if "vs_ceiling_pearson_r" not in result:
        raise Missing("fidelity.json has no paired comparison with the grammar ceiling: rerun the synthesis stage")
    return [_row("synthesis", "Pearson r of Corr(app, POI) with the real cohort (Eq. 26)", "synthetic cohort",
                 result["pearson_r"], "ceiling: the real traces serialised and written back", result["ceiling"]["pearson_r"],
                 result["vs_ceiling_pearson_r"], True, result)]


def _glance_completion(run: Run) -> list[dict]:
    result = read_json(run.output("compare"))
    if "engine_minus_baseline" not in result:
        raise Missing("comparison.json has no paired differences (engine_minus_baseline): rerun the compare stage")
    rows, notes = [], benchmark_notes(cold_split=result.get("cold_split", "cold"))
    for task in ("short", "long", "cold"):
        table, differences = result["tasks"].get(task) or {}, result["engine_minus_baseline"].get(task)
        if not differences:
            rows.append(_not_run(f"completion: {task}", f"the compare stage scored no engine on the {task} task"))
            continue
        engine = next(m for m in table if m.startswith("engine"))
        best = min(differences, key=lambda b: table[b]["rmse_norm"])
        rows.append(_row(f"completion: {task}", "rmse_norm", engine, table[engine]["rmse_norm"], best,
                         table[best]["rmse_norm"], differences[best], False, result, notes.get(f"completion: {task}")))
    return rows


def _glance_pituning(run: Run) -> list[dict]:
    report = read_json(run.output("pituning"))
    if not _ran(run, "lightgbm"):
        raise Missing(run.why_missing("lightgbm"))
    baselines = read_json(run.output("lightgbm"))
    tuned = next(m for m in report["metrics"] if m.startswith("PITuning"))
    best = max(baselines["metrics"], key=lambda b: baselines["metrics"][b]["prec_m"])
    if tuned not in report.get("class_counts", {}) or best not in baselines.get("class_counts", {}):
        raise Missing("the PITuning or LightGBM stage saved no per-user intent counts (class_counts): rerun both")
    difference = macro_precision_difference(report["class_counts"][tuned], baselines["class_counts"][best])
    return [_row("PITuning", "prec_m", tuned, report["metrics"][tuned]["prec_m"], best,
                 baselines["metrics"][best]["prec_m"], difference, True, report, benchmark_notes().get("PITuning"))]


GLANCE = [(("profiles: schema_valid", "profiles: grounding@3"), "evaluate", _glance_profiles),
          (("DPO",), "novelty", _glance_dpo),
          (("novelty recommendation",), "novelty", _glance_novelty),
          (("synthesis",), "synthesis", _glance_synthesis),
          (("completion: short", "completion: long", "completion: cold"), "compare", _glance_completion),
          (("PITuning",), "pituning", _glance_pituning)]


def _ran(run: Run, stage: str) -> bool:
    """The stage succeeded (now or earlier), or the run has no status for it (no pipeline.json)."""
    return run.status.get(stage, {}).get("status") in (None, "done", "skipped", "recorded")


def _not_run(capability: str, why: str) -> dict:
    return {"capability": capability, "method": f"not run: {why}", "verdict": "not run"}


def section_glance(run: Run) -> Section:
    s = Section("at-a-glance", "Results at a glance",
                "One row per capability: the method, the best baseline, method minus baseline with its 95% CI (a paired "
                "bootstrap over users; over entities on a city file) and the verdict: better or worse when the CI "
                "excludes 0, tie when it straddles 0. A red box above lists every result at or beyond its floor "
                "(scope/run/floors.py), a sign that something is wrong rather than that a method lost.")
    violations = [m for messages in all_violations(run.root).values() for m in messages]
    if violations:
        s.blocks.append({"kind": "violations", "messages": violations})
    rows = []
    for capabilities, stage, build in GLANCE:
        try:
            rows += build(run)
        except Exception as err:  # noqa: BLE001 - one unreadable stage must not hide the other rows
            if not _ran(run, stage):
                why = run.why_missing(stage)
            elif isinstance(err, Missing):
                why = str(err)
            else:
                log.exception("at a glance: %s", capabilities)
                why = f"could not read the results of stage '{stage}': {type(err).__name__}: {err}"
            rows += [_not_run(c, why) for c in capabilities]
    s.blocks.append({"kind": "glance", "rows": rows})
    return s


# --------------------------------------------------------------------------- the page

def build_report(run_dir: str | Path, out_dir: str | Path, config_path: str | Path | None = None,
                 title: str = "U-SCOPE / U-MASK toolchain: run report") -> Path:
    """Write ``out_dir/index.html`` (+ report.json and figure PNGs) for the run in ``run_dir``."""
    run = Run.open(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_text = Path(config_path).read_text() if config_path and Path(config_path).exists() else None
    embeddings, cluster_figures = section_embeddings(run, out)
    completion, completion_curves = section_completion(run, out)
    try:
        curves = section_curves(run, out, completion_curves)
    except Exception as err:  # noqa: BLE001 - unreadable logs must not break the page
        curves = Section("curves", "Training curves", "")
        curves.missing(f"could not read the training logs: {type(err).__name__}: {err}")
    sections = [section_glance(run), section_cohort(run), section_student(run), section_synthesis(run),
                embeddings, completion, section_pituning(run), curves, section_run(run, config_text)]
    statuses = {name: row.get("status") for name, row in run.status.items()}
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=select_autoescape(["html", "jinja"]))
    page = env.get_template(TEMPLATE).render(
        nav=NAV, title=title, sections=sections,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        missing_count=sum(b["kind"] == "missing" for s in sections for b in s.blocks))
    write_text(out / "index.html", page)
    (out / "index.html").chmod(0o644)  # a page to share: readable by others
    write_json(out / "report.json", {
        "run_dir": str(run_dir), "statuses": statuses, "figures": cluster_figures,
        "sections": {s.id: [{k: v for k, v in b.items() if k != "data"} for b in s.blocks] for s in sections}})
    return out / "index.html"
