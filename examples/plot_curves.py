"""Draw learning curves: vtm_acc_temporal, mc_acc and order_flip against the training step, one line per run, into
one PNG (three panels side by side, y from 0 to 1).

    python examples/plot_curves.py out/tiny                                        # writes out/tiny/curves.png
    python examples/plot_curves.py out/tiny/roll out/tiny/none out/tiny/flatten    # the --ablation runs
    python examples/plot_curves.py runs/a/metrics.jsonl runs/b --out curves.png

A run is its folder or its metrics.jsonl; its points are the curve rows (train_tiny.py --curve-every) and the full
evaluations (squares), and its label the folder's name (and its temporal mode where that differs). Dashed: chance in
the synthetic pre-training evaluation; order_flip has none (a model blind to frame order scores 0). No plotting
package: the lines are numpy pixels and the text a 3x5 pixel font.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
from einops import rearrange

import train_videos as tv  # the companion, beside this file: write_image

tt = tv.tt  # train_tiny.py

METRICS = ("vtm_acc_temporal", "mc_acc", "order_flip")
CHANCE = {"vtm_acc_temporal": 0.5, "mc_acc": 1 / 6}  # synthetic pre-training: match or not; one of 6 time variants
COLOURS = np.array([[214, 39, 40], [31, 119, 180], [44, 160, 44], [255, 127, 14], [148, 103, 189], [140, 86, 75],
                    [227, 119, 194], [127, 127, 127]], np.uint8)
W, H, LEFT, RIGHT, TOP, BOTTOM, LEGEND = 320, 200, 40, 16, 28, 40, 16  # a panel's plot area and margins; a legend row

# The font: each glyph is five rows from the top, each row an octal digit (4: its left pixel, 2: middle, 1: right)
GLYPHS = dict(zip(" 0123456789abcdefghijklmnopqrstuvwxyz_.-/:?;", """00000
    75557 26227 71747 71317 55711 74717 74757 71122 75757 75717 25755 65656 34443 65556 74647 74644 34553 55755 72227
    11152 55655 44447 57555 75555 25552 65644 25563 65655 34216 72222 55557 55552 55775 55255 55222 71247 00007 00002
    00700 11244 02020 71202 02022""".split()))


def text(img, s, x, y, colour=(0, 0, 0), align="left", scale=2):
    """Draw s in the font (it has one case; a character it lacks is a ?), its top at y, starting, centred or ending
    at x."""
    codes = np.array([[int(d) for d in GLYPHS.get(ch, GLYPHS["?"])] for ch in s.lower()])  # (chars, 5 rows)
    bits = np.pad((codes[..., None] >> np.array([2, 1, 0])) & 1, ((0, 0), (0, 0), (0, 1)))  # a blank column after each
    mask = rearrange(bits, "n r c -> r (n c)").repeat(scale, 0).repeat(scale, 1).astype(bool)
    x -= {"left": 0, "centre": mask.shape[1] // 2, "right": mask.shape[1]}[align]
    mask = mask[:, : img.shape[1] - x]  # what fits
    img[y: y + mask.shape[0], x: x + mask.shape[1]][mask] = colour


def line(img, x0, y0, x1, y1, colour, width=2, dash=0):
    """A straight line, width pixels thick (dashed: dash pixels drawn, dash not, ...)."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    keep = (np.arange(n) // dash) % 2 == 0 if dash else np.ones(n, bool)
    xs, ys = (np.linspace(a, b, n).round().astype(int)[keep] for a, b in ((x0, x1), (y0, y1)))
    for dy in range(width):
        for dx in range(width):
            img[ys + dy, xs + dx] = colour


def read_run(path):
    """(label, {step: row}) of a run folder or its metrics.jsonl: the rows with the metrics drawn here, a step's with
    the most clips where there are several (a --resume may evaluate a step again)."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise tt.BadInput(f"{path}: no metrics.jsonl (a train_tiny.py run folder has one)")
    rows = []
    for n, row in enumerate(file.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(row))
        except json.JSONDecodeError:
            raise tt.BadInput(f"{file} line {n}: not a JSON row") from None
    rows = [r for r in rows if any(m in r for m in METRICS)]
    if not rows:
        raise tt.BadInput(f"{file}: no rows with {', '.join(METRICS)} (train_tiny.py --curve-every N records them)")
    name, temporal = file.resolve().parent.name, rows[-1].get("temporal")
    label = name if temporal in (None, name) else f"{name} {temporal}"
    return label, {r["step"]: r for r in sorted(rows, key=lambda r: (r["step"], r.get("clips", 0)))}


def x_ticks(top):
    """0, d, 2d, ... up to top: d is 1, 2 or 5 times a power of ten, at most 6 of them."""
    d = 10 ** max(0, math.floor(math.log10(max(top, 1) / 3)))
    return range(0, top + 1, next(k * d for k in (1, 2, 5, 10) if top / (k * d) <= 6))


def panel(runs, metric, top, chance):
    """One metric's panel: its title, axes, the chance level and each run's line."""
    img = np.full((TOP + H + BOTTOM, LEFT + W + RIGHT, 3), 255, np.uint8)

    def at(step, value):  # pixel (x, y) of a point
        return LEFT + round(step / top * (W - 1)), TOP + round((1 - value) * (H - 1))

    text(img, metric, LEFT + W // 2, 8, align="centre")
    for v in (0, 0.25, 0.5, 0.75, 1):
        line(img, *at(0, v), *at(top, v), (225, 225, 225) if 0 < v < 1 else (150, 150, 150), width=1)
    for s in x_ticks(top):
        line(img, *at(s, 0), *at(s, 1), (150, 150, 150) if s in (0, top) else (235, 235, 235), width=1)
        text(img, str(s), at(s, 0)[0], TOP + H + 8, align="centre")
    text(img, "step", LEFT + W // 2, TOP + H + 24, (110, 110, 110), align="centre")
    for v in (0, 0.5, 1):
        text(img, f"{v:g}", LEFT - 6, at(0, v)[1] - 4, align="right")
    if chance is not None:
        line(img, *at(0, chance), *at(top, chance), (120, 120, 120), width=1, dash=4)
    for colour, (_, rows) in zip(COLOURS, runs):
        points = [(at(s, r[metric]), r.get("kind") != "curve") for s, r in sorted(rows.items()) if metric in r]
        for ((x0, y0), _), ((x1, y1), _) in zip(points, points[1:]):
            line(img, x0 - 1, y0 - 1, x1 - 1, y1 - 1, colour)
        for (x, y), full in points:
            if full:  # a full evaluation: a square
                img[y - 3: y + 3, x - 3: x + 3] = colour
    return img


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (train_tiny.py --out) or their metrics.jsonl files")
    p.add_argument("--out", default="", help="the PNG to write (default: curves.png in the first run's folder)")
    args = p.parse_args(argv)
    runs = [read_run(path) for path in args.runs]
    top = max(max(rows) for _, rows in runs)
    pretrain = all(r.get("task") == "pretrain" for _, rows in runs for r in rows.values())
    img = np.concatenate([panel(runs, m, max(top, 1), CHANCE.get(m) if pretrain else None) for m in METRICS], 1)
    legend = np.full((LEGEND * len(runs) + 8, img.shape[1], 3), 255, np.uint8)
    for i, (colour, (label, rows)) in enumerate(zip(COLOURS, runs)):
        line(legend, LEFT, LEGEND * i + 5, LEFT + 24, LEGEND * i + 5, colour)
        text(legend, label, LEFT + 32, LEGEND * i + 1)
        last = rows[max(rows)]
        print(f"{label}: {len(rows)} points up to step {max(rows)}, the last "
              + " ".join(f"{m} {last[m]:.3f}" for m in METRICS if m in last))
    note = "squares: full evaluations" + ("; dashed: chance" if pretrain else "")
    text(legend, note, img.shape[1] - RIGHT, 1, (110, 110, 110), align="right")
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "curves.png"
    tt.make_folder(out.parent)
    tt.write_file(out, lambda f: tv.write_image(f, np.concatenate([img, legend])))
    print(f"wrote {out}")


if __name__ == "__main__":
    with tt.one_line_errors():
        main()
