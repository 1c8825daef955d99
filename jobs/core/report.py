"""Run report: ``OUT/report.html``, one self-contained page per run (charts and thumbnails
inlined as data URIs, no network, works offline and from ``s3://``).

::

    python -m jobs report OUT [--html FILE]

Written at the end of every pipeline run and of the ``mirror-llava-*`` commands; this
command rebuilds it from ``OUT/manifest.json`` and the committed rows. Sections: the
placeholder/audit-mode banner, the funnel per stage (in, out, rejected by the stage's filter,
errored; chart and table), each filter of a funnel row's ``failures_by_filter`` (count, 0
included, whether it ran and in which mode), Ray Data's per-stage throughput and wall time
(``manifest["stage_stats"]``, see ``jobs.core.stats``), a gallery of kept samples and one of
rejected samples with their reasons (what a pipeline shows is its ``REPORT`` ``Gallery``),
the loss curve of a training run, the resolved recipe and the package versions.
Charts: matplotlib (Agg, SVG); page: the jinja2 template ``jobs/core/templates/report.html.j2``.
"""
from __future__ import annotations

import argparse
import base64
import importlib
import io as stdio
import json
from dataclasses import dataclass, field

import yaml

from jobs.core import registry, store
from udfs import io
from udfs import rows as R

THUMB_PX = 256  # longest side of a gallery thumbnail
GALLERY_SIZE = 12  # samples per gallery


@dataclass(frozen=True)
class Gallery:
    """What a pipeline's report shows per sample (its module's ``REPORT``).

    ``phase``: whose committed rows (``"rows"`` for single-phase pipelines); ``image``: the
    column holding an image URI (absolute, ``s3://``, or relative to the working folder or to
    OUT); ``text``: columns shown as labelled text; ``scores``: columns shown as figures
    (numbers, lists or JSON objects of numbers).
    """

    phase: str = "rows"
    image: str | None = None
    text: tuple[str, ...] = ()
    scores: tuple[str, ...] = field(default_factory=tuple)


def _svg(fig) -> str:
    """A matplotlib figure as a ``data:image/svg+xml`` URI."""
    import matplotlib.pyplot as plt

    buf = stdio.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(height_rows: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8, 0.9 + 0.28 * max(1, height_rows)))


def funnel_chart(funnel: list[dict]) -> str | None:
    """Horizontal stacked bars per funnel row: the share of the units entering the stage that
    went out, were rejected, errored or were not selected (``--limit``), each bar labelled
    ``in → out``. Shares, not counts: one ingest of thousands would dwarf every stage."""
    if not funnel:
        return None
    rows = funnel[::-1]
    fig, ax = _figure(len(rows))
    labels = [_label(r) for r in rows]
    left = [0.0] * len(rows)
    for key, color in (("out", "#4c9a52"), ("rejected", "#e08a2c"), ("errored", "#c8423b"),
                       ("not_selected", "#b9b9b9")):
        vals = [100.0 * (r.get(key) or 0) / r["in"] if r.get("in") else 0.0 for r in rows]
        ax.barh(labels, vals, left=left, color=color, label=key.replace("_", " "))
        left = [a + b for a, b in zip(left, vals)]
    for y, r in enumerate(rows):
        ax.text(101, y, f"{r.get('in', 0)} → {r.get('out', 0)} {r.get('unit', '')}".rstrip(), va="center", fontsize=7)
    ax.set_xlim(0, 125)
    ax.set_xlabel("% of the units entering the stage")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=7, frameon=False)
    ax.tick_params(axis="y", labelsize=8)
    return _svg(fig)


def throughput_chart(stage_stats: list[dict]) -> str | None:
    """Wall seconds per Ray Data operator, labelled with its rows/s."""
    if not stage_stats:
        return None
    fig, ax = _figure(len(stage_stats))
    labels = [f"{r.get('phase', 'rows')}{' ingest' if r.get('ingest') else ''}: "
              f"{', '.join(r['stages']) or r['operator']}"[:60] for r in stage_stats][::-1]
    walls = [r["wall_s"] for r in stage_stats][::-1]
    bars = ax.barh(labels, walls, color="#4a78b5")
    for bar, r in zip(bars, stage_stats[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['rows_per_s']:.2f} rows/s",
                va="center", fontsize=7)
    ax.set_xlabel("operator wall time (s)")
    ax.tick_params(axis="y", labelsize=8)
    return _svg(fig)


def loss_chart(curve: list[dict]) -> str | None:
    """Training loss per step (``mirror-llava-train``)."""
    points = [(p["step"], p["loss"]) for p in curve or [] if p.get("loss") is not None]
    if not points:
        return None
    fig, ax = _figure(8)
    ax.plot([s for s, _ in points], [v for _, v in points], marker="o", color="#4a78b5")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    return _svg(fig)


def _label(r: dict) -> str:
    return f"{r['phase']}: {r['stage']}" if r.get("phase") else str(r["stage"])


def thumbnail(uri: str, out: str) -> str | None:
    """A JPEG data URI of the image at ``uri`` (tried as given, then relative to ``out``);
    None when it cannot be read (the card then names the missing file instead)."""
    from PIL import Image

    for candidate in (uri, io.join(out, uri)):
        try:
            data = io.read_bytes(candidate)
        except (OSError, FileNotFoundError, ValueError):
            continue
        try:
            img = Image.open(stdio.BytesIO(data)).convert("RGB")
        except Exception:  # noqa: BLE001 - not an image: shown as missing
            return None
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = stdio.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return None


def _score(v) -> str:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return v
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_score(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_score(x) for x in v)
    return str(v)


def _cards(rows: list[dict], spec: Gallery, out: str) -> list[dict]:
    cards = []
    for r in rows:
        image = r.get(spec.image) if spec.image else None
        cards.append({
            "id": r["id"],
            "image": thumbnail(image, out) if image else None,
            "image_uri": image,
            "text": [(c, r[c]) for c in spec.text if r.get(c) not in (None, "")],
            "scores": [(c, _score(r[c])) for c in spec.scores if r.get(c) is not None],
            "stage": r.get(R.STAGE) or "",
            "reason": r.get(R.REASON) or "",
            "audit": r.get(R.AUDIT) or "",
            "placeholder": r.get(R.PLACEHOLDER) or "",
        })
    return cards


def galleries(out: str, manifest: dict) -> tuple[list[dict], list[dict]]:
    """Up to ``GALLERY_SIZE`` kept and rejected/errored samples, as cards (``id``, ``image``
    data URI, ``text``, ``scores``, ``stage``, ``reason``, ``audit``): for a pipeline, the
    committed rows of its ``REPORT`` phase; for a command, what its module's
    ``report_rows(out, manifest) -> (Gallery, kept, rejected)`` returns. Empty otherwise."""
    entry = registry.command_for(manifest)
    if entry is None:
        return [], []
    module = importlib.import_module(entry.module)
    if not entry.pipeline:  # a command: its module's report_rows(out, manifest), if any
        hook = getattr(module, "report_rows", None)
        found = hook(out, manifest) if hook else None
        if not found:
            return [], []
        spec, kept, dropped = found
        return _cards(kept[:GALLERY_SIZE], spec, out), _cards(dropped[:GALLERY_SIZE], spec, out)
    spec = getattr(module, "REPORT", None)
    if spec is None:
        return [], []
    single = spec.phase == "rows"
    uri = io.join(store.work(out) if single else store.work(out, spec.phase), "rows")
    wanted = [R.ID, *R.CONTROL_COLUMNS, *([spec.image] if spec.image else []), *spec.text, *spec.scores]
    table = store.read_table(uri, columns=list(dict.fromkeys(wanted)))
    if table is None:
        return [], []
    rows = sorted(table.to_pylist(), key=lambda r: r[R.ID])
    kept = [r for r in rows if r[R.STATUS] == R.OK][:GALLERY_SIZE]
    dropped = [r for r in rows if r[R.STATUS] != R.OK][:GALLERY_SIZE]
    return _cards(kept, spec, out), _cards(dropped, spec, out)


def _figures(manifest: dict) -> list[tuple[str, str]]:
    """Scalar figures of a command's manifest (``mirror-llava-*``), nested objects one level
    deep as ``outer.inner``."""
    skip = {"argv", "command", "funnel", "stage_stats", "loss_curve", "config", "recipe"}
    flat = []
    for k, v in manifest.items():
        if k in skip:
            continue
        items = v.items() if isinstance(v, dict) else [(None, v)]
        flat += [(f"{k}.{sub}" if sub else k, _score(x)) for sub, x in items
                 if x is not None and isinstance(x, (int, float, str, bool))]
    return flat


def build(out: str) -> str:
    """The report page of the run in ``out`` (local or ``s3://``) as HTML text.

    Raises ``FileNotFoundError`` when ``out`` has no ``manifest.json``.
    """
    import jinja2

    m = store.load_manifest(out)
    kept, rejected = galleries(out, m)
    env = jinja2.Environment(loader=jinja2.PackageLoader("jobs.core", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    funnel = m.get("funnel", [])
    return env.get_template("report.html.j2").render(
        m=m, out=out, title=m.get("pipeline") or m.get("command") or "run",
        funnel=funnel, funnel_keys=["in", "out", "rejected", "errored", "not_selected"],
        label=_label, funnel_chart=funnel_chart(funnel),
        stage_stats=m.get("stage_stats", []), throughput_chart=throughput_chart(m.get("stage_stats", [])),
        loss_chart=loss_chart(m.get("loss_curve", [])), figures=[] if "pipeline" in m else _figures(m),
        kept=kept, rejected=rejected,
        recipe=yaml.safe_dump(m.get("recipe") or m.get("config") or {}, sort_keys=False),
        versions=sorted((m.get("versions") or {}).items()), models=m.get("models", {}))


def write(out: str) -> str:
    """Write ``OUT/report.html``; returns its URI."""
    return io.write_text(io.join(out, "report.html"), build(out))


def write_quietly(out: str) -> str | None:
    """``write`` for the end of a run: a report that cannot be built is a warning on stderr,
    never a failed run (the rows and manifest are already committed)."""
    import sys

    try:
        return write(out)
    except Exception as e:  # noqa: BLE001 - the run's results stand without their report
        print(f"warning: report.html not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def main(argv: list[str]) -> int:
    """``python -m jobs report OUT [--html FILE]``."""
    ap = argparse.ArgumentParser(prog="python -m jobs report", description="Write OUT/report.html for a run.")
    ap.add_argument("output", help="a run's output folder or s3:// URI")
    ap.add_argument("--html", help="write the page here instead of OUT/report.html")
    args = ap.parse_args(argv)
    if args.html:
        io.write_text(args.html, build(args.output))
        print(args.html)
    else:
        print(write(args.output))
    return 0
