"""The report of fp8lab compare: DIR/report.md, a self-contained DIR/report.html (inline CSS,
PNGs embedded as data URIs, nothing fetched) and the plots as DIR/plots/*.png.

Both documents are rendered from one list of blocks, so they say the same thing."""

from __future__ import annotations

import base64
import html
import math
import os
import re
from pathlib import Path

from fp8lab.compare.plots import BASELINE, PLOTS, make_plots
from fp8lab.fsutil import atomic_write, fsync_dir

DASH = "–"
TITLE = "fp8lab compare: BF16 vs FP8"

# Blocks: ("h", level, text) ("p", segs) ("note", segs) ("pre", text) ("ul", [segs, ...])
# ("table", headers, aligns, rows of cells) ("img", name, title, png bytes).
# Segments: a plain string, or (style, text) with style "b", "i", "code" or "verdict";
# a cell is a string or a list of segments.


def write_report(out_dir: Path, summary: dict, curves: dict) -> dict:
    """Write report.md, report.html and plots/*.png into `out_dir`; returns their paths as
    {"md": Path, "html": Path, "plots": [Path, ...]}. A plot that cannot be drawn is not
    written (a stale one from an earlier report is removed) and the report says why."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    summary = summary or {}
    plots, skipped = make_plots(summary, curves or {})
    paths = []
    for p in plots:
        paths.append(plots_dir / f"{p.name}.png")
        _write_bytes(paths[-1], p.png)
    for name in skipped:
        (plots_dir / f"{name}.png").unlink(missing_ok=True)
    blocks = _blocks(summary, plots, skipped)
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write(md, _markdown(blocks))
    atomic_write(page, _html(blocks))
    return {"md": md, "html": page, "plots": paths}


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---- numbers ----

def _fmt(v, spec: str, suffix: str = "") -> str:
    if v is None or isinstance(v, bool):
        return DASH
    if isinstance(v, (int, float)):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return format(v, spec) + suffix
    return str(v)


def tokens(v) -> str:
    return _fmt(v, ",.0f")


def loss(v) -> str:
    return _fmt(v, ".4f")


def gap(v) -> str:
    return _fmt(v, "+.4f")


def ratio(v) -> str:
    return _fmt(v, ".2f", "x")


def _int(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else _fmt(v, "g")


def _yes_no(v) -> str:
    return {True: "yes", False: "no"}.get(v, "not checked") if isinstance(v, bool) or v is None else str(v)


def _list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [] if v is None else [v]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- content ----

def _blocks(s: dict, plots, skipped: dict[str, str]) -> list:
    results = [r for r in s.get("results") or [] if isinstance(r, dict)]
    env = s.get("environment") if isinstance(s.get("environment"), dict) else {}
    checks = s.get("checks") if isinstance(s.get("checks"), dict) else {}
    noise = s.get("noise") if isinstance(s.get("noise"), dict) else {}
    b: list = [("h", 1, TITLE)]

    meta: list[list] = []
    for label in ("created", "config"):
        if s.get(label):
            meta.append([f"{label} ", ("code", str(s[label]))])
    if s.get("overrides"):
        meta.append(["overrides ", ("code", " ".join(map(str, _list(s["overrides"]))))])
    if s.get("seeds") is not None:
        meta.append([f"seeds {', '.join(map(str, _list(s['seeds']))) or DASH}"])
    if s.get("steps") is not None:
        per = f" of {tokens(s['tokens_per_step'])} tokens" if s.get("tokens_per_step") is not None else ""
        meta.append([f"{_int(s['steps'])} steps{per}"])
    if meta:
        b.append(("p", [seg for i, part in enumerate(meta) for seg in ([" · "] if i else []) + part]))
    if s.get("command"):
        b.append(("pre", str(s["command"])))

    b.append(("h", 2, "Verdict"))
    sentences: list = []
    for r in results:
        name = str(r.get("recipe", "?"))
        if name == BASELINE and r.get("status") in ("ok", None):
            continue
        sentences += [("b", str(r.get("label") or name)), ": ", ("verdict", str(r.get("verdict") or DASH))]
        detail = r.get("verdict_detail") or r.get("reason")
        sentences += [f" — {detail}" if detail else ""]
        if name != BASELINE and r.get("speedup_vs_bf16") is not None:
            sentences += [f"; {ratio(r['speedup_vs_bf16'])} the tokens/s of bf16"
                          + (" (emulated, not representative)" if r.get("emulated") else "")]
        sentences += [". "]
    if not any(str(r.get("recipe")) != BASELINE for r in results):
        sentences.append("No FP8 recipe was compared.")
    if sentences and isinstance(sentences[-1], str):
        sentences[-1] = sentences[-1].rstrip()
    b.append(("p", [x for x in sentences if x]))
    for note in _list(env.get("notes")):
        b.append(("note", [str(note)]))

    b.append(("h", 2, "Results"))
    rows = []
    for r in results:
        events = _list(r.get("divergence_events"))
        notes = [str(r["reason"])] if r.get("reason") else []
        notes += [_plural(len(events), "divergence event")] if events else []
        notes += ["emulated"] if r.get("emulated") else []
        rows.append([str(r.get("label") or r.get("recipe", "?")), [("verdict", str(r.get("verdict") or DASH))],
                     tokens(r.get("tokens_per_s")), ratio(r.get("speedup_vs_bf16")), _fmt(r.get("mem_peak_gb"), ".2f"),
                     loss(r.get("final_train_loss")), loss(r.get("final_eval_loss")), gap(r.get("loss_gap")),
                     str(r.get("converted_layers") or DASH), "; ".join(notes) or DASH])
    listed = {str(r.get("recipe")) for r in results}
    for name in s.get("recipes") or []:
        if str(name) not in listed:
            rows.append([str(name), DASH, DASH, DASH, DASH, DASH, DASH, DASH, DASH, "no result recorded"])
    b.append(("table", ["recipe", "verdict", "tokens/s", "vs bf16", "peak mem GB", "final train loss",
                        "final eval loss", "gap vs bf16", "FP8 linears", "notes"], "llrrrrrrll", rows))
    band = noise.get("band")
    b.append(("ul", [
        ["Metric: ", str(s.get("metric") or DASH)],
        ["Rule: ", str(s.get("rule") or DASH)],
        ["Noise band: ", ("b", f"±{loss(band)}" if band is not None else "none")]
        + ([f" — {noise['how']}"] if noise.get("how") else []),
        [f"bf16 {s.get('metric') or 'loss'} per seed: ",
         ", ".join(loss(x) for x in _list(noise.get("bf16_losses"))) or DASH],
    ]))
    events = [(r.get("recipe"), e) for r in results for e in _list(r.get("divergence_events"))
              if isinstance(e, dict)]
    if events:
        b.append(("h", 3, "Divergence events"))
        b.append(("table", ["recipe", "seed", "step", "kind", "message"], "lrrll",
                  [[str(rc), _int(e.get("seed")), _int(e.get("step")), str(e.get("kind") or DASH),
                    str(e.get("message") or DASH)] for rc, e in events]))

    b.append(("h", 2, "Checks"))
    b.append(("ul", [["Same initial weights across recipes: ", ("b", _yes_no(checks.get("same_init")))],
                     ["Same data across recipes: ", ("b", _yes_no(checks.get("same_data")))]]))
    if checks.get("detail"):
        b.append(("p", [str(checks["detail"])]))

    b.append(("h", 2, "Environment"))
    known = [("device", "GPU / device"), ("torch", "torch"), ("torchao", "torchao"), ("cuda", "CUDA"),
             ("python", "Python"), ("emulated", "FP8 emulated")]
    env_rows = [[label, DASH if env.get(k) is None else _yes_no(env[k]) if k == "emulated" else str(env[k])]
                for k, label in known]
    env_rows += [[str(k), str(v)] for k, v in env.items() if k not in dict(known) and k != "notes"]
    b.append(("table", ["item", "value"], "ll", env_rows))

    b.append(("h", 2, "Runs"))
    run_rows = [[str(r.get("recipe", "?")), _int(run.get("seed")), str(run.get("status") or DASH),
                 _int(run.get("steps")), tokens(run.get("tokens_per_s")), loss(run.get("final_train_loss")),
                 loss(run.get("final_eval_loss")), _int(run.get("rollbacks")),
                 [("code", str(run["run_dir"]))] if run.get("run_dir") else DASH]
                for r in results for run in _list(r.get("runs")) if isinstance(run, dict)]
    b.append(("table", ["recipe", "seed", "status", "steps", "tokens/s", "final train loss", "final eval loss",
                        "rollbacks", "run dir"], "lrlrrrrrl", run_rows) if run_rows else ("p", ["No runs recorded."]))

    b.append(("h", 2, "Plots"))
    made = {p.name: p for p in plots}
    for name, (title, caption) in PLOTS.items():
        if name in made:
            b.append(("img", name, title, made[name].png))
            b.append(("p", [("i", caption)]))
        else:
            b.append(("p", [("b", title), f": not drawn — {skipped.get(name, 'no data')}."]))
    return b


# ---- markdown ----

def _md_text(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text))
    for ch in "\\`*[]<|":
        text = text.replace(ch, "\\" + ch)
    return text


def _md_segs(segs) -> str:
    if isinstance(segs, str):
        return _md_text(segs)
    out = []
    for seg in segs:
        if isinstance(seg, str):
            out.append(_md_text(seg))
            continue
        style, text = seg
        if style == "code":
            text = " ".join(text.split())
            tick = "``" if "`" in text else "`"
            out.append(f"{tick} {text} {tick}" if tick == "``" else f"`{text}`")
        elif style == "i":
            out.append(f"*{_md_text(text)}*")
        else:
            out.append(f"**{_md_text(text)}**")
    return "".join(out)


def _markdown(blocks) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + _md_text(blk[2]))
        elif kind == "p":
            out.append(_md_segs(blk[1]))
        elif kind == "note":
            out.append("> **Note:** " + _md_segs(blk[1]))
        elif kind == "pre":
            fence = "~~~~" if "```" in blk[1] else "```"
            out.append(f"{fence}\n{blk[1]}\n{fence}")
        elif kind == "ul":
            out.append("\n".join("- " + _md_segs(item) for item in blk[1]))
        elif kind == "table":
            _, headers, aligns, rows = blk
            lines = ["| " + " | ".join(_md_text(h) for h in headers) + " |",
                     "|" + "|".join("---:" if a == "r" else "---" for a in aligns) + "|"]
            lines += ["| " + " | ".join(_md_segs(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{_md_text(blk[2])}](plots/{blk[1]}.png)")
    return "\n\n".join(out) + "\n"


# ---- html ----

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1040px; margin: 2em auto;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #d4d4d4; padding: .25em .6em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; } td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: .6em .8em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
code { background: #f3f3f3; padding: 0 .2em; }
.note { background: #fff4e0; border-left: 4px solid #f0a020; padding: .5em .8em; margin: .6em 0; }
.verdict { font-weight: 600; } .v-parity, .v-baseline { color: #1b7f2a; } .v-worse { color: #b45f00; }
.v-diverged, .v-failed { color: #c0192c; } .v-inconclusive, .v-unsupported { color: #6a6a6a; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption, .caption { color: #555; font-size: .9em; }
"""


def _html_segs(segs) -> str:
    if isinstance(segs, str):
        return html.escape(segs)
    out = []
    for seg in segs:
        if isinstance(seg, str):
            out.append(html.escape(seg))
            continue
        style, text = seg
        t = html.escape(text)
        if style == "verdict":
            cls = "".join(ch for ch in text.lower() if ch.isalnum() or ch == "-")
            out.append(f'<span class="verdict v-{cls}">{t}</span>')
        else:
            out.append({"b": f"<strong>{t}</strong>", "i": f"<em>{t}</em>", "code": f"<code>{t}</code>"}[style])
    return "".join(out)


def _html(blocks) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append(f"<h{blk[1]}>{html.escape(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            out.append(f"<p>{_html_segs(blk[1])}</p>")
        elif kind == "note":
            out.append(f'<div class="note"><strong>Note:</strong> {_html_segs(blk[1])}</div>')
        elif kind == "pre":
            out.append(f"<pre>{html.escape(blk[1])}</pre>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_html_segs(item)}</li>" for item in blk[1]) + "</ul>")
        elif kind == "table":
            _, headers, aligns, rows = blk
            cls = [' class="r"' if a == "r" else "" for a in aligns]
            head = "".join(f"<th{c}>{html.escape(h)}</th>" for h, c in zip(headers, cls))
            body = "".join("<tr>" + "".join(f"<td{c}>{_html_segs(cell)}</td>" for cell, c in zip(row, cls)) + "</tr>"
                           for row in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(blk[3]).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(blk[2])}" src="data:image/png;base64,{data}"></figure>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(TITLE)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(out) + "\n</body>\n</html>\n")
