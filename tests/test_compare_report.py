"""fp8lab compare's report: report.md, a self-contained report.html and the PNG plots, from a
synthetic summary and synthetic curves (no training)."""

from __future__ import annotations

import base64
import copy
import math
import re

import pytest
from PIL import Image

from fp8lab.compare.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ["loss_vs_step", "loss_vs_time", "tokens_per_s", "loss_gap"]
STEPS = 60
EVIL = "needs sm_89 <script>alert(1)</script>"


def _curve(seed: int, *, offset=0.0, speed=1.0, diverge_at=None) -> dict:
    steps = list(range(1, STEPS + 1))
    loss = [2.0 + 4.0 * math.exp(-s / 12) + offset + 0.02 * math.sin(s * (seed + 1)) for s in steps]
    if diverge_at is not None:  # blows up, then stops being finite
        loss = [x if s < diverge_at else (x * 30 if s < diverge_at + 3 else None) for s, x in zip(steps, loss)]
    wall = [s * 0.1 / speed for s in steps]
    ev = [20, 40, 60]
    return {"step": steps, "loss": loss, "wall_s": wall, "tokens_per_s": [2048 / 0.1 * speed] * STEPS,
            "eval_step": ev, "eval_loss": [loss[s - 1] if loss[s - 1] is not None else None for s in ev]}


def _result(recipe, verdict, *, status="ok", tps=8485.0, speedup=1.0, gap=0.003, reason=None, events=(), seeds=(0, 1)):
    ok = status in ("ok", "diverged")
    return {
        "recipe": recipe, "status": status, "reason": reason, "verdict": verdict,
        "verdict_detail": f"{recipe} detail", "tokens_per_s": tps if ok else None,
        "speedup_vs_bf16": speedup if ok else None, "mem_peak_gb": 1.2 if ok else None,
        "final_train_loss": 2.1 if ok else None, "final_eval_loss": 2.09 if ok else None,
        "loss_gap": gap if ok else None, "emulated": recipe != "bf16" if ok else None,
        "divergence_events": list(events),
        "runs": [{"seed": s, "run_dir": f"runs/{recipe}-seed{s}", "status": "completed" if ok else status,
                  "steps": STEPS if ok else 0, "tokens_per_s": tps if ok else None,
                  "final_train_loss": 2.1 if ok else None, "final_eval_loss": 2.09 if ok else None,
                  "rollbacks": 0} for s in seeds],
    }


def _inputs(seeds=(0, 1), band=0.021):
    recipes = ["bf16", "fp8-tensorwise", "fp8-rowwise", "mxfp8"]
    summary = {
        "format": 1, "created": "2026-11-29T15:00:00Z", "command": "fp8lab compare -c configs/demo.toml --train.steps=60",
        "config": "configs/demo.toml", "overrides": ["--train.steps=60"], "recipes": recipes, "seeds": list(seeds),
        "steps": STEPS, "tokens_per_step": 2048,
        "environment": {"device": "cpu", "torch": "2.13.0+cpu", "torchao": "0.18.0", "cuda": None, "python": "3.11.7",
                        "emulated": True, "notes": ["FP8 runs in TorchAO's emulation: NOT representative"]},
        "checks": {"same_init": True, "same_data": None, "detail": "initial weights hashed"},
        "noise": {"band": band, "how": "spread of bf16 seeds", "bf16_losses": [2.09, 2.11]},
        "metric": "final eval loss", "rule": "parity when |gap| <= band",
        "results": [
            _result("bf16", "baseline", seeds=seeds),
            _result("fp8-tensorwise", "parity", tps=3400.0, speedup=0.40, seeds=seeds),
            _result("fp8-rowwise", "diverged", status="diverged", tps=3000.0, speedup=0.35, gap=None, seeds=seeds,
                    events=[{"seed": 0, "step": 30, "kind": "spike", "message": "loss 14.9 is 3.4x the mean"}]),
            _result("mxfp8", "unsupported", status="unsupported", reason=EVIL, seeds=seeds),
        ],
    }
    curves = {
        "bf16": {s: _curve(s) for s in seeds},
        "fp8-tensorwise": {s: _curve(s, offset=0.004, speed=0.4) for s in seeds},
        "fp8-rowwise": {s: _curve(s, offset=0.01, speed=0.35, diverge_at=30 if s == 0 else None) for s in seeds},
    }
    return summary, curves


def _check_png(path, data=None):
    raw = path.read_bytes()
    assert raw.startswith(PNG_MAGIC)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert 600 <= w <= 900 and 350 <= h <= 500, (path.name, im.size)  # ~7x4 in at 110 dpi
    if data is not None:
        assert raw == data


def _embedded(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _table_rows(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_report_files_and_embedded_images(tmp_path):
    summary, curves = _inputs()
    paths = write_report(tmp_path, summary, curves)

    assert paths["md"] == tmp_path / "report.md" and paths["md"].is_file()
    assert paths["html"] == tmp_path / "report.html" and paths["html"].is_file()
    assert sorted(p.name for p in paths["plots"]) == sorted(f"{n}.png" for n in ALL_PLOTS)
    for p in paths["plots"]:
        assert p.parent == tmp_path / "plots"
        _check_png(p)

    page = paths["html"].read_text()
    images = _embedded(page)
    assert page.count("data:image/png;base64,") == len(images) == 4
    # Each embedded image is byte for byte the PNG on disk, in the report's order.
    assert images == [(tmp_path / "plots" / f"{n}.png").read_bytes() for n in ALL_PLOTS]

    # Self-contained: no external resources, no scripts.
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    # Strings from the summary are escaped.
    assert "needs sm_89 &lt;script&gt;alert(1)&lt;/script&gt;" in page

    md = paths["md"].read_text()
    rows = _table_rows(md, "recipe")
    assert [r[0] for r in rows] == ["bf16", "fp8-tensorwise", "fp8-rowwise", "mxfp8"]
    assert [r[1] for r in rows] == ["**baseline**", "**parity**", "**diverged**", "**unsupported**"]
    by = {r[0]: r for r in rows}
    assert by["bf16"][2] == "8,485" and by["fp8-tensorwise"][3] == "0.40x" and by["fp8-tensorwise"][7] == "+0.0030"
    assert by["mxfp8"][2] == "–" and "\\<script>" in by["mxfp8"][9]
    assert "1 divergence event" in by["fp8-rowwise"][9]
    for n in ALL_PLOTS:
        assert f"](plots/{n}.png)" in md
    for text in ("fp8lab compare -c configs/demo.toml", "NOT representative", "2.13.0+cpu", "0.18.0",
                 "parity when", "±0.0210", "not checked", "runs/fp8-rowwise-seed1"):
        assert text in md and text in page, text


def test_no_bf16_curve_means_no_gap_plot(tmp_path):
    summary, curves = _inputs()
    summary["results"][0].update(status="failed", verdict="failed", reason="out of memory")
    del curves["bf16"]
    # A gap plot from an earlier report in the same folder must not survive.
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss_gap.png").write_bytes(b"stale")

    paths = write_report(tmp_path, summary, curves)
    assert not (tmp_path / "plots" / "loss_gap.png").exists()
    assert sorted(p.name for p in paths["plots"]) == ["loss_vs_step.png", "loss_vs_time.png", "tokens_per_s.png"]
    md = paths["md"].read_text()
    assert "Loss gap vs bf16 per step**: not drawn — bf16 has no loss curve (status: failed)" in md
    assert "plots/loss_gap.png" not in md
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "not drawn — bf16 has no loss curve" in page


@pytest.mark.parametrize("seeds,band", [((0,), 0.021), ((0, 1), None), ((3,), None)])
def test_single_seed_and_no_noise_band(tmp_path, seeds, band):
    summary, curves = _inputs(seeds=seeds, band=band)
    paths = write_report(tmp_path, summary, curves)
    assert len(paths["plots"]) == 4
    for p in paths["plots"]:
        _check_png(p)
    md = paths["md"].read_text()
    assert ("**none**" in md) == (band is None)
    assert len(_table_rows(md, "recipe")) == 4
    assert len(_table_rows(md, "recipe | seed | status")) == 4 * len(seeds)


def test_sparse_inputs_do_not_crash(tmp_path):
    """Missing keys, string seed keys (JSON), all-None losses and no wall-clock times."""
    summary, curves = _inputs()
    summary = {k: v for k, v in summary.items() if k in ("recipes", "results")}
    summary["results"] = copy.deepcopy(summary["results"])
    for r in summary["results"]:
        r.pop("divergence_events"), r.pop("runs"), r.pop("verdict_detail")
    curves = {r: {str(s): {k: v for k, v in c.items() if k != "wall_s"} for s, c in seeds.items()}
              for r, seeds in curves.items()}
    curves["fp8-tensorwise"]["0"]["loss"] = [None] * STEPS
    paths = write_report(tmp_path, summary, curves)
    names = {p.name for p in paths["plots"]}
    assert names == {"loss_vs_step.png", "tokens_per_s.png", "loss_gap.png"}
    assert "Train loss vs training time**: not drawn — no run recorded wall-clock times" in paths["md"].read_text()
    assert "No runs recorded." in paths["md"].read_text()


def test_empty_inputs(tmp_path):
    paths = write_report(tmp_path / "new" / "dir", {}, {})
    assert paths["plots"] == []
    assert paths["md"].is_file() and paths["html"].is_file()
    assert "No FP8 recipe was compared." in paths["md"].read_text()
