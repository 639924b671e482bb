"""A short, human-readable summary of a cohort and its behaviour tensors (Markdown + JSON + PNGs)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scope.io import save_figure, write_json, write_text  # noqa: E402


def activity_figure(events: pd.DataFrame, group: pd.Series, path: Path) -> None:
    """Hour-of-day share of records per group (e.g. persona), weekdays vs weekends."""
    ts = events["timestamp"]
    frame = pd.DataFrame({"group": group.reindex(events["user_id"]).to_numpy(), "hour": ts.dt.hour,
                          "weekend": ts.dt.day_of_week >= 5})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, weekend in zip(axes, (False, True)):
        part = frame[frame["weekend"] == weekend]
        share = part.groupby("group")["hour"].value_counts(normalize=True).unstack(fill_value=0)
        for name, row in share.iterrows():
            ax.plot(row.index, row.to_numpy(), marker="o", ms=3, label=name)
        ax.set(title="weekends" if weekend else "weekdays", xlabel="hour of day", xticks=range(0, 24, 3))
    axes[0].set_ylabel("share of the group's records")
    drawn = next((ax for ax in axes if ax.lines), axes[0])
    if drawn.lines:
        fig.legend(*drawn.get_legend_handles_labels(), loc="upper right", fontsize=8)
    save_figure(fig, path)


def apps_figure(events: pd.DataFrame, group: pd.Series, categories: list[str], path: Path) -> None:
    """App-category share per group as a heatmap."""
    frame = pd.DataFrame({"group": group.reindex(events["user_id"]).to_numpy(), "cat": events["app_category"]})
    share = frame.groupby("group")["cat"].value_counts(normalize=True).unstack(fill_value=0)
    share = share.reindex(columns=range(len(categories)), fill_value=0)
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(share) + 1.5))
    im = ax.imshow(share.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(categories)), categories, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(share)), share.index)
    fig.colorbar(im, ax=ax, label="share of records")
    save_figure(fig, path)


def tensor_figure(item: dict[str, np.ndarray], channels: list[str], path: Path, slot_minutes: int = 15) -> None:
    """One (user, window) tensor: app usage over time, presence per cell, and availability."""
    x, available = item["x"], item["available"]
    C, T, H, W = x.shape
    hours = np.arange(T) * slot_minutes / 60
    fig, axes = plt.subplots(3, 1, figsize=(12, 8), sharex=True, height_ratios=[3, 2, 1])
    usage = x[: C - 2].sum(axis=(2, 3))
    axes[0].imshow(np.log1p(usage), aspect="auto", cmap="magma", extent=(0, hours[-1], C - 2.5, -0.5))
    axes[0].set_yticks(range(C - 2), [c.removeprefix("app:") for c in channels[: C - 2]], fontsize=7)
    axes[0].set_title(f"user {int(item['user_id'])}, window {int(item['window'])}: log1p(records) per app category")
    axes[1].imshow(x[C - 2].reshape(T, H * W).T, aspect="auto", cmap="Greys", extent=(0, hours[-1], H * W - 0.5, -0.5))
    axes[1].set_ylabel("cell (h*W+w)")
    axes[1].set_title("presence per spatial cell")
    axes[2].imshow(available.reshape(T, H * W).any(1)[None], aspect="auto", cmap="RdYlGn", vmin=0, vmax=1,
                   extent=(0, hours[-1], 0, 1))
    axes[2].set(yticks=[], xlabel="hours since window start", title="available (green) / missing (red)")
    save_figure(fig, path)


def summarize(events: pd.DataFrame, categories: list[str], dataset: dict, example: dict[str, np.ndarray],
              out_dir: str | Path, personas: pd.Series | None = None, load_report: dict | None = None) -> dict:
    """Write ``summary.md``, ``summary.json`` and three figures to ``out_dir``; return the JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_user = events.groupby("user_id").size()
    group = personas if personas is not None else pd.Series("all users", index=per_user.index)
    activity_figure(events, group, out / "activity_by_group.png")
    apps_figure(events, group, categories, out / "apps_by_group.png")
    tensor_figure(example, dataset["channels"], out / "example_tensor.png", dataset["config"]["slot_minutes"])
    totals = dataset["totals"]
    summary = {
        "users": int(len(per_user)),
        "events": int(len(events)),
        "days": int(events["timestamp"].dt.floor("D").nunique()),
        "events_per_user": {q: float(per_user.quantile(p)) for q, p in (("p10", .1), ("median", .5), ("p90", .9))},
        "groups": group.value_counts().to_dict(),
        "tensor_shape": dataset["shape"],
        "layout": dataset["layout"],
        "windows": totals["items"],
        "split_users": {name: len(users) for name, users in dataset["splits"].items()},
        "events_outside_layout": totals["dropped_events"] / max(totals["events"], 1),
        "load_report": load_report or {},
    }
    write_json(out / "summary.json", summary)
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary["groups"].items())
    shape = dataset["shape"]
    write_text(out / "summary.md", f"""# Cohort summary

{summary['users']:,} users, {summary['events']:,} records over {summary['days']} days
(records per user: p10 {summary['events_per_user']['p10']:.0f}, median {summary['events_per_user']['median']:.0f},
p90 {summary['events_per_user']['p90']:.0f}).

| group | users |
|---|---|
{rows}

Behaviour tensors: {totals['items']:,} windows of C={shape['C']} x T={shape['T']} x H={shape['H']} x W={shape['W']}
({dataset['layout']} layout); {summary['events_outside_layout']:.1%} of records fall outside the layout.
Users per split: {', '.join(f'{k} {v}' for k, v in summary['split_users'].items())}.

![hour-of-day activity](activity_by_group.png)

![app categories](apps_by_group.png)

![one behaviour tensor](example_tensor.png)
""")
    return summary
