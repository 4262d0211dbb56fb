"""
Train and evaluate All-in-One on your own videos: train_tiny.py's loop, with clips decoded by PyAV from data files.

    python examples/train_videos.py --data clips.csv --vocab vocab.txt --init all-in-one-base.ckpt --out out/mine
    python examples/train_videos.py --task qa --data qa.csv --val-data qa_val.csv --vocab vocab.txt --init all-in-one-base.ckpt
    python examples/train_videos.py --eval-only --init all-in-one-base.ckpt --vocab vocab.txt --val-data test.csv --out out/eval
    python examples/train_videos.py --samples 72 --out out/world      # the synthetic world as videos and data files
    torchrun --nproc_per_node=4 examples/train_videos.py --data clips.csv ...

Every option of train_tiny.py works here too. Read top to bottom: the options for your data; decoding frames as the
paper's code samples them (and as an official checkpoint saw them); data files kept as columns; the dataset and the
data object the loop takes (Clips); --samples; loading a model for the other example scripts.
"""

import array
import bisect
import copy
import csv
import io
import json
import math
import random
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tiny as tt  # noqa: E402
from allinone import vtm_batch  # noqa: E402
from train_tiny import (  # noqa: E402
    CAPTIONS, QUESTIONS, BadInput, Captions, Choices, HeldOut, Progress, Questions, answer_to, caption_text, make_folder,
    normalize, option, render, time_variants, write_file,
)


@dataclass
class VideoOptions(tt.Options):
    data: str = option("", "train on your clips: a CSV or JSON-lines file (README: Your own videos)")
    val_data: str = option("", "held-out clips, or a multiple-choice file (default: --val-share of --data)")
    val_share: float = option(0.05, "share of --data's videos held out when no --val-data")
    video_root: str = option("", "folder the video paths are relative to (default: the data file's)")
    answers: int = option(0, "--task qa: the N most frequent training answers are the classes (0: every answer)")
    workers: int = option(2, "DataLoader processes decoding clips (0: in the main process)")
    shuffle_buffer: int = option(100, "WebDataset shards: samples each shard reader shuffles among (1: shard order)")
    max_bad_share: float = option(0.1, "stop when more than this share of clips fail to load")
    temperature: float = option(0.05, "contrastive temperature (the official one)")
    samples: int = option(0, "write OUT/samples.png of training clips (synthetic: also this many clips as videos with "
                             "data files); stop")

    may_change_on_resume = tt.Options.may_change_on_resume | {"workers"}
    may_change_to_evaluate = tt.Options.may_change_to_evaluate | {"val_data", "video_root"}

    def checks(self, need):
        for name in ("data", "val_data"):  # shards: a .tar, a brace pattern or a folder (shard_list checks them)
            need(not getattr(self, name) or Path(getattr(self, name)).is_file() or is_shards(getattr(self, name)),
                 f"{tt.flag(name)} {getattr(self, name)}: no such file")
        need(tt.finite(self.val_share) and 0 < self.val_share < 1, f"--val-share must be between 0 and 1, got {self.val_share}")
        need(tt.finite(self.max_bad_share) and 0 <= self.max_bad_share <= 1,
             f"--max-bad-share must be between 0 and 1, got {self.max_bad_share}")
        need(self.shuffle_buffer >= 1, f"--shuffle-buffer must be at least 1, got {self.shuffle_buffer}")
        for name in ("answers", "workers", "samples"):
            need(getattr(self, name) >= 0, f"{tt.flag(name)} must be 0 or more, got {getattr(self, name)}")
        need(self.data or self.val_data or self.samples, "no data: --data (and --val-data), or --val-data with "
                                                         "--eval-only; python train_tiny.py trains on synthetic clips")


def data_class(opts):  # WebDataset shards, or data files
    return Shards if is_shards(opts.data) or is_shards(opts.val_data) else Clips


def main(argv=None):
    opts = tt.parse_options(argv, VideoOptions)  # a bad option: argparse's one-line error
    with tt.one_line_errors():
        if opts.samples:
            write_samples(opts)
        else:
            tt.run(opts, data_class(opts))


# -----------------------------------------------------------------------------
# Decoding: frames sampled as in the paper's code, decoded with PyAV by seeking to the keyframe before each

class ClipError(BadInput):
    """A clip that cannot be loaded; the message names the file and the reason."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # an image is a clip of one repeated frame
SQUASH, ZOOM = 512, 1.2  # official frames: squashed to 512x512, resized to 1.2 x size, then cropped to size


def segment_frames(n, num_frames, train=False, generator=None):
    """Split n frames into num_frames equal segments, segment k = floor(k n / T) .. floor((k+1) n / T) - 1, and take
    each one's middle frame (evaluation) or a random one (training). With n < T some segments are empty and take
    their first frame, so frames repeat in order."""
    picks = []
    for k in range(num_frames):
        lo = k * n // num_frames
        hi = max(lo, (k + 1) * n // num_frames - 1)
        picks.append(int(torch.randint(lo, hi + 1, (1,), generator=generator)) if train else (lo + hi) // 2)
    return picks


def frame_table(container, stream):
    """Presentation times of all frames and of the keyframes, from the packets alone (no decoding)."""
    pts, keys, packets = [], [], 0
    for packet in container.demux(stream):
        if packet.size == 0 and packet.pts is None:  # the demuxer's closing flush packet
            continue
        packets += 1
        if packet.pts is not None and not packet.is_discard:
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    if stream.frames and packets < stream.frames:  # a cut file whose index (at the front) promises more
        raise ClipError(f"truncated ({packets} of {stream.frames} frames)")
    return sorted(pts), sorted(keys) or sorted(pts)[:1]


def decode_at(container, stream, wanted, keys):
    """Frames shown at the sorted times `wanted`: seek to the keyframe before one, decode forward to it, and seek
    again only to jump over a keyframe. A demuxer that seeks by decode time (MPEG-TS) can land a keyframe late:
    then the keyframe before, then the start of the file."""
    found, frames, last = {}, None, None
    for p in wanted:
        i = max(bisect.bisect_right(keys, p) - 1, 0)
        if frames is None or last.pts < keys[i]:
            for key in keys[max(i - 1, 0): i + 1][::-1] + [-(2**40)]:
                container.seek(key, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                last = next(frames, None)
                if last is not None and last.pts <= p:
                    break
        while last is None or last.pts < p:
            last = next(frames, None)
            if last is None:
                raise ClipError(f"no frame decoded at pts {p}")
        found[p] = last
    return found


def to_rgb(frame, size, crop, preprocess):
    """A decoded frame as uint8 (size, size, 3), turned upright as its rotation metadata says (decord, which the
    official code reads with, does too). ours: the shorter side resized to size (PyAV, in C), cropped at relative
    offsets crop (0.5, 0.5 = the centre). official: squashed to 512x512 (bilinear, as decord), resized to 1.2 x size
    as Pillow's bilinear filter does (the official transform's), then cropped (its centre crop rounds as it does)."""
    quarter = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns that make it upright
    w, h = (frame.height, frame.width) if quarter % 2 else (frame.width, frame.height)  # as shown
    if preprocess == "official":
        w = h = int(ZOOM * size)
        img = np.rot90(frame.reformat(width=SQUASH, height=SQUASH, format="rgb24").to_ndarray(), quarter)
        img = resize_like_pillow(np.ascontiguousarray(img), w)
        y, x = (int(round((w - size) / 2)),) * 2 if crop is None else (int(c * (w - size + 1)) for c in crop)
        return img[y: y + size, x: x + size]
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    stored_w, stored_h = (h, w) if quarter % 2 else (w, h)
    img = np.rot90(frame.reformat(width=stored_w, height=stored_h, format="rgb24").to_ndarray(), quarter)
    y, x = (int(c * (s - size + 1)) for c, s in zip(crop or (0.5, 0.5), (h, w)))
    return img[y: y + size, x: x + size]


def resize_like_pillow(img, size):
    """uint8 (n, n, 3) -> (size, size, 3) as Pillow's Image.resize(BILINEAR): a triangle filter widened by the scale
    when shrinking, weights in 22-bit fixed point, rows first and rounded to uint8 before the columns."""
    weights = pillow_weights(img.shape[0], size)  # (size, n) int64
    rows = np.clip((np.einsum("ox,yxc->yoc", weights, img.astype(np.int64)) + (1 << 21)) >> 22, 0, 255)
    return np.clip((np.einsum("oy,yxc->oxc", weights, rows) + (1 << 21)) >> 22, 0, 255).astype(np.uint8)


def pillow_weights(n_in, n_out):
    """The weights of Pillow's bilinear resampling from n_in to n_out pixels (its precompute_coeffs), fixed point."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # the triangle's half-width, widened when shrinking
    out = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        w = np.maximum(0.0, 1 - np.abs((np.arange(lo, hi) - centre + 0.5) / support))
        out[o, lo:hi] = w / w.sum()
    return np.trunc(out * (1 << 22) + 0.5).astype(np.int64)  # C's (int)(0.5 + w * 2^22), all w >= 0


def decode_clip(path, num_frames, size, train=False, start=None, end=None, generator=None, preprocess="ours", data=None):
    """num_frames frames of a video as uint8 (num_frames, 3, size, size), picked among the frames whose time (seconds
    from the first frame) lies in [start, end). Training picks random frames of each segment and a random crop (from
    generator); evaluation the segment middles and the centre. An image file is one frame, repeated. data: the file's
    bytes, decoded from memory (path then only names it). Raises ClipError."""
    try:
        with av.open(str(path) if data is None else io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ClipError("no video stream")
            stream = container.streams.video[0]
            crop = torch.rand(2, generator=generator).tolist() if train else None
            if Path(path).suffix.lower() in IMAGE_SUFFIXES:
                frame = next(container.decode(stream), None)
                if frame is None:
                    raise ClipError("no image decoded")
                clip = np.stack([to_rgb(frame, size, crop, preprocess)] * num_frames)
            else:
                if torch.utils.data.get_worker_info() is None:  # slice threads: no frame delay after each seek
                    stream.codec_context.thread_type = "SLICE"
                else:  # one thread in each DataLoader worker, so that workers do not oversubscribe the CPU
                    stream.codec_context.thread_count = 1
                pts, keys = frame_table(container, stream)
                first = pts[0] if pts else 0
                lo = first + (start or 0) / stream.time_base
                hi = math.inf if end is None else first + end / stream.time_base
                pts = [p for p in pts if lo <= p < hi]
                if not pts:
                    raise ClipError("no video frames" + ("" if start is None and end is None else f" in [{start}, {end}) s"))
                wanted = [pts[i] for i in segment_frames(len(pts), num_frames, train, generator)]
                frames = decode_at(container, stream, sorted(set(wanted)), keys)
                clip = np.stack([to_rgb(frames[p], size, crop, preprocess) for p in wanted])
    except ClipError as e:
        raise ClipError(f"cannot load {path}: {e}") from None
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise ClipError(f"cannot load {path}: {getattr(e, 'strerror', None) or e}") from None
    return torch.from_numpy(clip).permute(0, 3, 1, 2).contiguous()


def load_clip(path, num_frames, size, train=False, start=None, end=None, generator=None, preprocess="ours"):
    """A clip as the model takes it: float32 (num_frames, 3, size, size), normalised. preprocess: "ours" (the shorter
    side resized to size, [-1, 1]) or "official" (the official pipeline: squash, resize, crop, ImageNet's mean and
    std). Raises ClipError."""
    return normalize(decode_clip(path, num_frames, size, train, start, end, generator, preprocess), preprocess)


# --- data files

KINDS = {"captions": "caption", "mc": "options and answer", "qa": "question and answer"}  # kind -> its columns
TASK_KIND = {"pretrain": "captions", "mc": "mc", "qa": "qa"}


def read_rows(path, video_root=""):
    """(kind, Rows) of a data file: a CSV with a header, or JSON lines (.jsonl or .json, any case), in UTF-8 with or
    without a byte-order mark. Every row has `video` (relative to video_root, else to the file's folder) and
    optional `start` / `end` (seconds); the kind follows the columns: `caption` (pre-training, retrieval), `options`
    (a JSON list) and `answer` (its index: multiple choice), or `question`, `answer` and optional `type` (QA). A bad
    row is an error naming the file and its line. The file is read a line at a time, into columns."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        records = ((n, json_row(path, n, line)) for n, line in enumerate(text_lines(path), 1) if line.strip())
    else:
        reader = csv.reader(text_lines(path))
        header = next(reader, [])
        records = ((reader.line_num, dict(zip(header, values))) for values in reader)
    rows = None
    for n, record in records:
        if rows is None:  # the first row's columns say what kind of file it is
            keys = record if isinstance(record, dict) else {}
            rows = Rows("mc" if "options" in keys else "qa" if "question" in keys else "captions",
                        Path(video_root) if video_root else path.parent)
        rows.append(parse_row(record, rows.kind, f"{path} line {n}"))
    if rows is None:
        raise BadInput(f"{path}: no rows")
    return rows.kind, rows.done()


def text_lines(path):
    """The lines of a UTF-8 file (a byte-order mark is fine); a line that is not UTF-8 is an error naming it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield (raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadInput(f"{path} line {n}: not UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8") from None


def json_row(path, n, line):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} line {n}: not JSON ({e.msg}); the file needs one JSON object per line") from None


def parse_row(row, kind, where):
    """A row checked: a dict of its video path (as written), start and end, and the columns of its kind."""
    if not isinstance(row, dict) or not str(row.get("video") or "").strip():
        raise BadInput(f"{where}: no 'video'")
    try:
        start, end = (None if row.get(k) in (None, "") else float(row[k]) for k in ("start", "end"))
    except ValueError:
        raise BadInput(f"{where}: start and end must be seconds, got {row.get('start')!r}, {row.get('end')!r}") from None
    if start is not None and end is not None and not start < end:
        raise BadInput(f"{where}: start {start} is not before end {end}")
    out = dict(video=str(row["video"]).strip(), start=start, end=end)

    def text(name):
        value = str(row.get(name) or "").strip()
        if not value:
            raise BadInput(f"{where}: empty {name}")
        return value

    if kind == "captions":
        out["caption"] = text("caption")
    elif kind == "qa":
        out.update(question=text("question"), answer=text("answer"), type=str(row.get("type") or "").strip())
    else:
        options = row.get("options")
        try:
            options = json.loads(options) if isinstance(options, str) else options
        except json.JSONDecodeError:
            options = None
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
            raise BadInput(f"{where}: options must be a JSON list of two or more captions")
        try:
            answer = int(row.get("answer"))
        except (TypeError, ValueError):
            raise BadInput(f"{where}: answer must be the index of the right option, got {row.get('answer')!r}") from None
        if not 0 <= answer < len(options):
            raise BadInput(f"{where}: answer {answer} is outside its {len(options)} options (0 to {len(options) - 1})")
        out.update(options=[o.strip() for o in options], answer=answer)
    return out


class TextColumn:
    """A column of texts as one UTF-8 buffer and the offset where each ends: about the bytes of the text itself."""

    def __init__(self):
        self.data, self.ends = bytearray(), array.array("q")

    def append(self, text):
        self.data += text.encode()
        self.ends.append(len(self.data))

    def done(self):  # numpy views: read-only from here on, shared by forked DataLoader workers as they are
        self.data, self.ends = np.frombuffer(self.data, np.uint8), np.frombuffer(self.ends, np.int64)
        return self

    def __getitem__(self, j):
        return self.data[self.ends[j - 1] if j else 0: self.ends[j]].tobytes().decode()


class Rows:
    """A data file's rows as columns (TextColumn, and start and end as one float array, NaN for none): no Python object a
    row, so millions of rows take about their bytes, and DataLoader workers share them without copy-on-write growth
    (there are no reference counts to touch). rows[i] is row i as a dict, with its video path under the root;
    rows.take(mask) is a subset over the same columns."""

    TEXTS = {"captions": ("video", "caption"), "qa": ("video", "question", "answer", "type"), "mc": ("video", "options")}

    def __init__(self, kind, root):
        self.kind, self.root, self.texts = kind, root, {name: TextColumn() for name in self.TEXTS[kind]}
        self.times, self.answer, self.options_end = array.array("d"), array.array("q"), array.array("q")
        self.index = None

    def append(self, row):
        for name, column in self.texts.items():
            if name == "options":
                for text in row["options"]:
                    column.append(text)
                self.options_end.append(len(column.ends))
                self.answer.append(row["answer"])
            else:
                column.append(row[name])
        self.times.extend([math.nan if row[k] is None else row[k] for k in ("start", "end")])

    def done(self):
        for column in self.texts.values():
            column.done()
        self.times = np.frombuffer(self.times, np.float64).reshape(-1, 2)
        self.answer, self.options_end = np.frombuffer(self.answer, np.int64), np.frombuffer(self.options_end, np.int64)
        self.index = np.arange(len(self.times))
        return self

    def take(self, mask):
        rows = copy.copy(self)
        rows.index = self.index[mask]
        return rows

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        j = self.index[i]
        start, end = (None if math.isnan(v) else float(v) for v in self.times[j])
        row = dict(video=self.video(j), start=start, end=end)
        for name in self.TEXTS[self.kind][1:]:
            if name == "options":
                first = self.options_end[j - 1] if j else 0
                row.update(options=[self.texts["options"][o] for o in range(first, self.options_end[j])],
                           answer=int(self.answer[j]))
            else:
                row[name] = self.texts[name][j]
        return row

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def video(self, j):  # the video path of row j of the columns, under the root
        return str(self.root / self.texts["video"][j])

    def texts_of(self):  # every caption, question and option: what a word-level vocabulary is made of
        for name in ("caption", "question"):
            if name in self.texts:
                yield from (self.texts[name][j] for j in self.index)
        if "options" in self.texts:
            yield from (option for r in self for option in r["options"])


def read_data(opts):
    """The training and held-out rows of --data and --val-data, checked against --task. Without --val-data,
    --val-share of --data's videos is held out, so that no video is in both."""
    kind = TASK_KIND[opts.task]
    train = val = None
    if opts.data:
        found, train = read_rows(opts.data, opts.video_root)
        if found != kind:
            raise BadInput(f"--data {opts.data} has {KINDS[found]} rows; --task {opts.task} trains on rows with "
                           f"{KINDS[kind]}")
    if opts.val_data:
        found, val = read_rows(opts.val_data, opts.video_root)
        if found != kind and not (opts.task == "pretrain" and found == "mc"):  # pre-training: zero-shot MC too
            raise BadInput(f"--val-data {opts.val_data} has {KINDS[found]} rows; --task {opts.task} evaluates rows "
                           f"with {KINDS[kind]}" + (" (or multiple choice)" if opts.task == "pretrain" else ""))
    else:  # hold out whole videos: the sorted paths in a seeded shuffle, the first --val-share of them
        column = train.texts["video"]
        path_of = {v: str(train.root / v) for v in {column[j] for j in train.index}}  # each video once, as written
        videos = sorted(set(path_of.values()))
        random.Random(opts.seed).shuffle(videos)
        held = set(videos[: max(1, round(opts.val_share * len(videos)))]) if len(videos) > 1 else set()
        held = {v for v, path in path_of.items() if path in held}
        out = np.fromiter((column[j] in held for j in train.index), bool, len(train))
        train, val = train.take(~out), train.take(out)
    if not val or not (train or opts.eval_only):
        raise BadInput(f"{opts.data or opts.val_data}: need clips both to train on and to hold out (got "
                       f"{len(train) if train else 0} and {len(val) if val else 0}); --eval-only needs only --val-data")
    return dict(train=train if train is not None else Rows(kind, Path()).done(), val=val, kind=val.kind)


# --- dataset, sampler, data source


class ClipDataset(torch.utils.data.Dataset):
    """Item (index, seed): that row's clip as uint8 and the row's index. Training: when the row's file cannot be
    loaded, the next row's (up to 20 tries); evaluation: None. The failures ride along to the main process, which
    reports and counts them (nothing raises in a worker)."""

    def __init__(self, rows, frames, size, train, preprocess):
        self.rows, self.frames, self.size, self.train, self.preprocess = rows, frames, size, train, preprocess

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, item):
        index, seed = item
        failures = []
        for i in range(index, index + (20 if self.train else 1)):
            row = self.rows[i % len(self.rows)]
            try:
                clip = decode_clip(row["video"], self.frames, self.size, self.train, row["start"], row["end"],
                                 torch.Generator().manual_seed(seed), self.preprocess)
                return clip, i % len(self.rows), failures
            except ClipError as e:
                failures.append((row["video"], str(e)))
        return None, index, failures


def collate(items):
    clips, rows, failures = zip(*items)
    failures = [f for fs in failures for f in fs]
    return (None if any(c is None for c in clips) else torch.stack(clips)), list(rows), failures


class StepBatches:
    """Index lists for steps start..steps-1: epochs of seeded permutations; process r of w takes samples r, r + w, ...
    of each step's global batch (a distributed sampler). The same in every run, so --resume continues the order."""

    def __init__(self, n, batch, seed, rank, world, start, steps):
        self.n, self.batch, self.seed, self.rank, self.world, self.start, self.steps = n, batch, seed, rank, world, start, steps
        self.epoch, self.order = None, None

    def __len__(self):
        return self.steps - self.start

    def position(self, p):  # the p-th sample of the whole run
        epoch, i = divmod(p, self.n)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self.order[i]), self.seed * 1_000_003 + p

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield [self.position(p) for p in range(step * self.batch + self.rank, (step + 1) * self.batch, self.world)]


class Skipped:
    """Clips that failed to load: each file reported once, every skipped sample counted; too many stop the run."""

    def __init__(self, max_share, loud):
        self.max_share, self.loud, self.files, self.count, self.total = max_share, loud, {}, 0, 0

    def add(self, failures, loaded):
        for path, message in failures:
            if path not in self.files and self.loud:
                print(f"warning: skipped {message}", flush=True)
            self.files.setdefault(path, message)
        self.count += len(failures)
        self.total += len(failures) + loaded
        if self.total >= 20 and self.count > self.max_share * self.total:
            self.stop(f"{self.count} of {self.total} clips failed to load, more than --max-bad-share {self.max_share}")

    def stop(self, why):
        examples = "\n  ".join(list(self.files.values())[:5])
        raise BadInput(f"{why}; {len(self.files)} files in all, for example:\n  {examples}")


class Clips:
    """Your clips, the data train_tiny's loop takes: decoded with PyAV in DataLoader workers; a file that fails is
    skipped, named once and counted."""

    shared = ()  # every key of a batch is per clip: its rows split among processes and micro-batches

    def __init__(self, opts, rank=0, world=1):
        rows = read_data(opts)
        self.opts, self.rank, self.world, self.kind = opts, rank, world, rows["kind"]
        self.rows, self.val = rows["train"], rows["val"]
        self.skipped = Skipped(opts.max_bad_share, loud=rank == 0)

    def texts(self):  # every caption, question and option: what a word-level vocabulary is made of
        return (text for rows in (self.rows, self.val) for text in rows.texts_of())

    def answer_vocabulary(self):
        """Every training answer, the most frequent first (ties in alphabetical order); --answers N: the first N."""
        counts = Counter(r["answer"] for r in self.rows)
        ranked = sorted(counts, key=lambda a: (-counts[a], a))
        return ranked[: self.opts.answers] if self.opts.answers else ranked

    def prepare(self, opts, cfg, tokens, preprocess, answers, device):
        self.opts, self.cfg, self.tokens, self.preprocess, self.device = opts, cfg, tokens, preprocess, device
        self.answers = {a: i for i, a in enumerate(answers)}
        if opts.compile:  # texts padded to one length: torch.compile would compile the step again for new lengths
            tokens.tok.enable_padding(pad_id=tokens.special_ids[0], pad_token="[PAD]", length=cfg.max_text_len)
        everything = len(self.rows)
        if opts.task == "qa":  # train only on answers in the vocabulary (--answers N)
            self.rows = self.rows.take(np.array([r["answer"] in self.answers for r in self.rows], bool))
        if self.rank == 0:
            print(self.summary(opts, cfg, answers, everything))
        return self

    def summary(self, opts, cfg, answers, everything):
        return (f"{opts.data or opts.val_data}: {len(self.rows)} training and {len(self.val)} held-out rows; texts "
                f"longer than {cfg.max_text_len} tokens are truncated (metrics.jsonl: truncated_captions)"
                + (f"; {everything - len(self.rows)} training rows' answers are outside the {len(answers)}-answer "
                   "vocabulary and left out" if opts.task == "qa" else ""))

    def loader(self, rows, train, sampler):
        return torch.utils.data.DataLoader(
            ClipDataset(rows, self.cfg.frames, self.cfg.image_size, train, self.preprocess), batch_sampler=sampler,
            collate_fn=collate, num_workers=self.opts.workers, pin_memory=self.device.type == "cuda")

    def batches(self, start):
        o = self.opts
        sampler = StepBatches(len(self.rows), o.batch, o.seed, self.rank, self.world, start, o.steps)
        for step, (video, index, failures) in enumerate(self.loader(self.rows, True, sampler), start):
            if video is None:
                self.skipped.add(failures, 0)
                self.skipped.stop("20 rows in a row failed to load")
            self.skipped.add(failures, len(video))
            yield self.batch(step, video, [self.rows[i] for i in index])

    def batch(self, step, video, rows):
        """The task's batch of decoded clips (uint8) and their rows, on the device."""
        o, dev = self.opts, self.device
        batch = dict(video=video)  # made on the CPU, then copied to the device without waiting (tt.to_device)
        g = torch.Generator().manual_seed(hash((o.seed, step, self.rank)) % 2**62)
        if o.task == "pretrain":
            ids, mask = self.tokens([r["caption"] for r in rows])
            other, labels = vtm_batch(torch.arange(o.vtm_clips // self.world), generator=g)  # half: another's caption
            batch.update(vtm_ids=ids[other], vtm_mask=mask[other], vtm_labels=labels, text_ids=ids, text_mask=mask)
            k = o.mlm_clips // self.world
            if k:
                masked, labels = self.tokens.mask_words(ids[:k], mask[:k], self.cfg.vocab_size, g)
                batch.update(mlm_ids=masked, mlm_mask=mask[:k], mlm_labels=labels)
        elif o.task == "mc":
            ids, mask = self.tokens([t for r in rows for t in r["options"]])
            batch.update(options_ids=ids.view(len(rows), -1, ids.shape[1]), options_mask=mask.view(len(rows), -1, ids.shape[1]),
                         answer=torch.tensor([r["answer"] for r in rows]))
        else:
            ids, mask = self.tokens([r["question"] for r in rows])
            batch.update(question_ids=ids, question_mask=mask, answer=torch.tensor([self.answers[r["answer"]] for r in rows]))
        batch = {k: tt.to_device(v, dev) for k, v in batch.items()}
        batch["video"] = normalize(batch["video"], self.preprocess)
        return batch

    def held_out(self):
        """The held-out rows grouped into clips (same video, start and end), each decoded once and kept as uint8."""
        clips = {}
        for r in self.val:
            key = (r["video"], r["start"], r["end"])
            if key in clips or len(clips) < self.opts.eval_clips:
                clips.setdefault(key, []).append(r)
        keys, videos, rows = list(clips), [], []
        meter = Progress("decoding held-out clips", len(keys), self.rank == 0)
        for video, index, failures in self.loader([clips[k][0] for k in keys], False, [[(i, 0)] for i in range(len(keys))]):
            self.skipped.add(failures, 0 if video is None else len(video))
            if video is not None:
                videos.append(video)
                rows.append(clips[keys[index[0]]])
            meter(1)
        return self.held_out_of(videos, rows)

    def held_out_of(self, videos, rows):
        """The held-out set of decoded clips (each (1, t, 3, H, W) uint8) and each clip's rows."""
        if not videos:
            self.skipped.stop("no held-out clip could be loaded")
        held, n = HeldOut(torch.cat(videos)), len(videos)
        clip = torch.tensor([c for c, rs in enumerate(rows) for _ in rs])  # the clip of each row
        flat = [r for rs in rows for r in rs]
        if self.kind == "captions":  # a caption's hit is its own clip; a clip's, any of its captions
            captions = [r["caption"] for r in flat]
            texts = {t: i for i, t in enumerate(dict.fromkeys(captions))}
            ids, mask = self.tokens(captions)
            first = torch.tensor([0] + [len(rs) for rs in rows[:-1]]).cumsum(0)
            held.captions = Captions(ids, mask, first=first, label=clip, clip_label=torch.arange(n),
                                     text=torch.tensor([texts[t] for t in captions]))
        elif self.kind == "mc":
            k = len(flat[0]["options"])
            if any(len(r["options"]) != k for r in flat):
                raise BadInput(f"{self.opts.val_data}: every row needs the same number of options ({k})")
            ids, mask = self.tokens([t for r in flat for t in r["options"]])
            held.choices["mc_acc"] = Choices(ids.view(len(flat), k, -1), mask.view(len(flat), k, -1), clip,
                                             torch.tensor([r["answer"] for r in flat]))
        else:
            ids, mask = self.tokens([r["question"] for r in flat])
            kinds = sorted({r["type"] for r in flat if r["type"]})
            held.questions = Questions(ids, mask, clip, torch.tensor([self.answers.get(r["answer"], -1) for r in flat]),
                                       torch.tensor([kinds.index(r["type"]) if r["type"] else -1 for r in flat]), kinds)
        if self.rank == 0:
            print(f"held out: {n} clips, {len(flat)} rows")
        return held

    def samples(self, k):
        k = min(k, len(self.rows))
        video, _, _ = collate([ClipDataset(self.rows, self.cfg.frames, self.cfg.image_size, False, "ours")[(i, 0)]
                               for i in range(k)])
        return video.float() / 255, [self.rows[i].get("caption") or self.rows[i].get("question") or "" for i in range(k)]


# -----------------------------------------------------------------------------
# WebDataset shards (video2dataset's layout): tar files of samples <key>.mp4, <key>.txt (the caption), <key>.json
# (url, caption, key, status, ...), read front to back in stream mode; videos decoded from memory

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


def is_shards(spec):
    return bool(spec) and (spec.endswith(".tar") or Path(spec).is_dir())


def shard_list(spec, flag):
    """The shard files of a .tar, a brace pattern (shards/{00000..00099}.tar) or a folder of .tar files."""
    if Path(spec).is_dir():
        paths = sorted(str(p) for p in Path(spec).glob("*.tar"))
    else:
        paths = braces(spec)
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise BadInput(f"{flag} {spec}: " + (f"no such shard {missing[0]} ({len(missing)} of {len(paths)} missing)"
                                             if missing else "no .tar files in it"))
    return paths


def braces(pattern):
    """A pattern's names: {00000..00099} a zero-padded range, {a,b} alternatives, as webdataset expands them."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = pattern.index("}", start)
    inside, rest = pattern[start + 1: end], braces(pattern[end + 1:])
    if ".." in inside:
        lo, hi = inside.split("..")
        choices = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = inside.split(",")
    return [pattern[:start] + c + r for c in choices for r in rest]


def shard_samples(path, failures):
    """(key, {extension: bytes}) of a shard's samples, members grouped by the name up to the first dot of their
    file name, as webdataset groups them. A truncated or corrupt shard ends there, its reason added to failures."""
    key, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                if (folder, stem) != key and files:
                    yield key[1], files
                    files = {}
                key, files[ext.lower()] = (folder, stem), tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        failures.append((path, f"shard {path} ends early: {e}"))
    if files:
        yield key[1], files


def sample_of(path, key, files):
    """(video bytes, its extension, caption) of a sample: the caption from .txt, else the .json's; or the reason it
    has none."""
    video = next((ext for ext in files if "." + ext.rsplit(".", 1)[-1] in VIDEO_SUFFIXES), None)
    caption = files["txt"].decode("utf-8", "replace").strip() if "txt" in files else ""
    if not caption and "json" in files:
        try:
            caption = str(json.loads(files["json"]).get("caption") or "").strip()
        except (ValueError, AttributeError):
            pass
    if video is None or not caption:
        return f"{path} sample {key}: no " + ("video" if video is None else "caption")
    return files[video], video, caption


class ShardStream(torch.utils.data.IterableDataset):
    """Training batches from shards: (clips, captions, shard:keys, the failures since the last batch), made in the
    DataLoader worker. Each pass, the shards in an order seeded by the pass; process r of w takes every w-th, worker i
    of n every n-th of those; their samples go through a shuffle buffer. A resumed run starts a new pass, seeded by its
    first step. A pass that loads nothing ends the stream with (None, [], [], failures)."""

    def __init__(self, shards, cfg, preprocess, seed, start, rank, world, buffer, batch=1):
        self.shards, self.cfg, self.preprocess, self.buffer, self.batch = shards, cfg, preprocess, buffer, batch
        self.seed, self.start, self.rank, self.world = seed, start, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pick, batch, failures = random.Random(hash((self.seed, self.start, self.rank, worker))), [], []
        for item in self.clips(pick, worker, workers, failures):
            batch.append(item)
            if len(batch) == self.batch:
                clips, captions, names = zip(*batch)
                yield torch.stack(clips), list(captions), list(names), list(failures)
                batch = []
                failures.clear()  # (in place: the readers of the shards add to this list)
        yield None, [], [], failures

    def clips(self, pick, worker, workers, failures):  # (clip, caption, name), pass after pass
        passes, loaded = 0, True
        while loaded:
            order = random.Random(hash((self.seed, self.start, passes))).sample(self.shards, len(self.shards))
            mine, loaded, passes = order[self.rank:: self.world][worker:: workers], False, passes + 1
            samples = ((shard, *sample) for shard in mine for sample in shard_samples(shard, failures))
            for sample in self.shuffled(samples, pick):
                item = self.decoded(sample, pick, failures)
                if item:
                    loaded = True
                    yield item

    def shuffled(self, samples, pick):  # through the shuffle buffer: each out is a random one of the last `buffer` in
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.buffer:
                yield buffer.pop(pick.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(pick.randrange(len(buffer)))

    def decoded(self, sample, pick, failures):  # (clip, caption, name), or None and the failure noted
        name, found = f"{sample[0]}:{sample[1]}", sample_of(*sample)
        if isinstance(found, str):
            failures.append((name, found))
            return None
        data, ext, caption = found
        try:
            clip = decode_clip(f"{name}.{ext}", self.cfg.frames, self.cfg.image_size, True, preprocess=self.preprocess,
                               generator=torch.Generator().manual_seed(pick.randrange(2**62)), data=data)
        except ClipError as e:
            failures.append((name, str(e)))
            return None
        return clip, caption, name


class Shards(Clips):
    """Your clips in WebDataset shards, for pre-training: streamed through DataLoader workers for training; the
    --val-data shards read once into the held-out set (at most --eval-clips samples, each key a clip)."""

    def __init__(self, opts, rank=0, world=1):
        self.opts, self.rank, self.world, self.kind = opts, rank, world, "captions"
        mixed = not is_shards(opts.val_data) or (opts.data and not is_shards(opts.data))  # shards with files, or none
        if opts.task != "pretrain" or mixed:
            raise BadInput("WebDataset shards hold captions: --task pretrain, with --data shards (unless --eval-only) "
                           "and --val-data shards")
        self.train = shard_list(opts.data, "--data") if opts.data else []
        self.val = shard_list(opts.val_data, "--val-data")
        readers = world * max(1, opts.workers)
        if self.train and len(self.train) < readers:
            raise BadInput(f"--data {opts.data}: {len(self.train)} shard(s) for {world} process(es) x "
                           f"{max(1, opts.workers)} DataLoader worker(s): each needs shards of its own (fewer --workers, "
                           "or more shards)")
        self.skipped = Skipped(opts.max_bad_share, loud=rank == 0)
        self.rows = ()  # streamed, not rows

    @staticmethod
    def samples_of(shards, limit, failures):
        """(name, video bytes, extension, caption) of the first limit good samples; the bad ones added to failures."""
        found = 0
        for shard in shards:
            for key, files in shard_samples(shard, failures):
                sample = sample_of(shard, key, files)
                if isinstance(sample, str):
                    failures.append((f"{shard}:{key}", sample))
                    continue
                found += 1
                yield (f"{shard}:{key}", *sample)
                if found >= limit:
                    return

    def texts(self):  # a word-level vocabulary: the held-out captions and the first 10,000 training samples'
        for shards, limit in ((self.val, self.opts.eval_clips), (self.train, 10_000)):  # (failures: counted where
            yield from (caption for *_, caption in self.samples_of(shards, limit, []))  # they are loaded)

    def answer_vocabulary(self):
        return []

    def summary(self, opts, cfg, answers, everything):
        return (f"{opts.data or opts.val_data}: {len(self.train)} training shard(s), held-out clips from "
                f"{len(self.val)} shard(s); texts longer than {cfg.max_text_len} tokens are truncated")

    def batches(self, start):
        o = self.opts
        stream = ShardStream(self.train, self.cfg, self.preprocess, o.seed, start, self.rank, self.world,
                             o.shuffle_buffer, batch=o.batch // self.world)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=o.workers,
                                             pin_memory=self.device.type == "cuda")
        for step, (video, captions, _, failures) in zip(range(start, o.steps), loader):
            self.skipped.add(failures, 0 if video is None else len(video))
            if video is None:
                self.skipped.stop("no sample of the --data shards could be loaded")
            yield self.batch(step, video, [dict(caption=c) for c in captions])

    def held_out(self):
        videos, rows, failures = [], [], []
        meter = Progress("decoding held-out clips", self.opts.eval_clips, self.rank == 0)
        for name, data, ext, caption in self.samples_of(self.val, self.opts.eval_clips, failures):
            try:
                videos.append(decode_clip(f"{name}.{ext}", self.cfg.frames, self.cfg.image_size,
                                          preprocess=self.preprocess, data=data)[None])
                rows.append([dict(caption=caption)])
            except ClipError as e:
                failures.append((name, str(e)))
            meter(1)
        self.skipped.add(failures, len(videos))
        return self.held_out_of(videos, rows)

    def samples(self, k):  # --samples: the first held-out clips
        found = list(self.samples_of(self.val, k, []))
        return torch.stack([decode_clip(f"{name}.{ext}", self.cfg.frames, self.cfg.image_size, data=data)
                            for name, data, ext, _ in found]).float() / 255, [caption for *_, caption in found]


# -----------------------------------------------------------------------------
# --samples: the synthetic world as files, or a strip of your training clips


def write_samples(opts):
    """--samples N: a PNG strip of training clips (at most 72, a clip a row) and their captions; synthetic, also the
    synthetic world as files: N new clips as lossless videos, a caption file, a multiple-choice file and a QA file."""
    synthetic = not (opts.data or opts.val_data)
    opts, model, data, ckpt = tt.setup(opts, torch.device("cpu"), tt.Synthetic if synthetic else data_class(opts))
    out = Path(opts.out)
    make_folder(out)
    if synthetic:
        g = torch.Generator().manual_seed(opts.seed)
        captions = torch.randint(len(CAPTIONS), (min(opts.samples, 72),), generator=g).tolist()
        video, texts = render(captions, data.cfg.frames, data.cfg.image_size, g), [caption_text(c) for c in captions]
    else:
        video, texts = data.samples(min(opts.samples, 72))
    write_file(out / "samples.png", lambda f: write_png(f, video))
    write_file(out / "samples.txt", lambda f: f.write(("\n".join(texts) + "\n").encode()))
    print(f"wrote {out / 'samples.png'} and {out / 'samples.txt'}")
    if synthetic:
        write_world(out, *new_clips(data.cfg, opts.samples, opts.seed), seed=opts.seed)


def new_clips(cfg, n, seed=0):
    """n new renders, as uint8 (n, t, 3, H, W), clip k of caption k mod 72 (so 72 hold every caption once), from a
    seed no training batch or held-out set uses: (captions, video)."""
    captions = torch.arange(n) % len(CAPTIONS)
    video = render(captions.tolist(), cfg.frames, cfg.image_size, torch.Generator().manual_seed(20_000_003 + seed))
    return captions, (video * 255).round().to(torch.uint8)


def write_world(out, captions, video, seed=0, fps=4):
    """The clips as OUT/clips/clipNNNNN.mp4 (H.264 in RGB, lossless: every pixel decodes as rendered) and the data
    files that go with them: captions.csv (video, caption), mc.jsonl (its 6 time variants as options, the answer
    among them) and qa.csv (the three questions); and the clips with their captions as WebDataset shards."""
    make_folder(out / "clips")
    g, names = torch.Generator().manual_seed(seed), []
    for k, clip in enumerate(video):
        names.append(f"clips/clip{k:05d}.mp4")
        write_file(out / names[-1], lambda f: write_video(f, clip, fps))
    rows = [(name, int(c)) for name, c in zip(names, captions)]
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([("video", "caption")] + [(v, caption_text(c)) for v, c in rows])
    write_file(out / "captions.csv", lambda f: f.write(table.getvalue().encode()))
    mc = []
    for v, c in rows:
        options = [time_variants(c)[i] for i in torch.randperm(6, generator=g)]
        mc.append(json.dumps(dict(video=v, options=[caption_text(o) for o in options], answer=options.index(c))))
    write_file(out / "mc.jsonl", lambda f: f.write(("\n".join(mc) + "\n").encode()))
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([("video", "question", "answer", "type")] + [
        (v, question, answer_to(c, kind), kind) for v, c in rows for kind, question in QUESTIONS.items()])
    write_file(out / "qa.csv", lambda f: f.write(table.getvalue().encode()))
    shards = write_shards(out / "shards", [(out / v, caption_text(c)) for v, c in rows])
    print(f"wrote {len(rows)} clips to {out / 'clips'}, and {out / 'captions.csv'}, {out / 'mc.jsonl'}, {out / 'qa.csv'};"
          f" as WebDataset shards {out / 'shards'}/{{00000..{shards - 1:05d}}}.tar")


def write_shards(folder, samples, per_shard=32):
    """(video file, caption) pairs as WebDataset shards in video2dataset's layout: FOLDER/00000.tar, ..., each of
    per_shard samples <key>.mp4, <key>.txt and <key>.json, the key 5 digits of the shard and 4 of the sample."""
    make_folder(folder)
    shards = (len(samples) + per_shard - 1) // per_shard

    def shard(n, f):
        with tarfile.open(fileobj=f, mode="w") as tar:
            for i, (video, caption) in enumerate(samples[n * per_shard: (n + 1) * per_shard]):
                key = f"{n:05d}{i:04d}"
                meta = dict(url=str(video), caption=caption, key=key, status="success")
                for name, data in ((f"{key}.mp4", Path(video).read_bytes()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    for n in range(shards):
        write_file(folder / f"{n:05d}.tar", lambda f, n=n: shard(n, f))
    return shards


def write_video(file, clip, fps):
    """uint8 (t, 3, H, W) as an MP4 file of RGB H.264 at quantiser 0: lossless (ffmpeg and VLC play it; some players
    cannot show RGB H.264)."""
    with av.open(file, "w", format="mp4") as out:
        stream = out.add_stream("libx264rgb", rate=fps, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = clip.shape[-1], clip.shape[-2], "rgb24"
        for frame in clip.permute(0, 2, 3, 1).numpy():
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode())


def write_png(file, video):
    """video (k, t, 3, H, W) in [0, 1] as one PNG: a clip a row, frames left to right, a white line after each."""
    video = F.pad(video, (0, 1), value=1.0)
    img = (rearrange(video, "k t c h w -> (k h) (t w) c") * 255).round().clamp(0, 255).byte()
    write_image(file, img.repeat_interleave(4, 0).repeat_interleave(4, 1).numpy())  # 4x larger, so the pixels show


def write_image(file, img):
    """A uint8 (H, W, 3) array as PNG, with PyAV's encoder, to an open binary file (write_file gives one)."""
    with av.open(file, "w", format="image2pipe") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = img.shape[1], img.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# -----------------------------------------------------------------------------
# For the other example scripts


def load_model(path, vocab="", device="cpu"):
    """Any checkpoint, ours or official (with its BERT vocab.txt), on the device (auto: as train_tiny.py picks): (the
    model in eval mode, its Tokens, its frame preprocessing, the heads it never trained). Bad files are a BadInput
    naming them."""
    opts = tt.Options(init=str(path), vocab=str(vocab or ""), **tt.TASK_DEFAULTS["pretrain"])
    if not Path(path).is_file():
        raise BadInput(f"{path}: no such checkpoint")
    try:
        start = tt.read_start_point(opts)
    except BadInput as e:  # the scripts have no --init
        raise BadInput(str(e).removeprefix("--init: ").replace("--init ", "")) from None
    tokenizer = start.tokenizer if start.ours else tt.make_tokenizer(opts.vocab, [])
    model, untrained, _ = tt.build_model(opts, start, tokenizer.get_vocab_size(), 0)
    model = model.to(tt.pick_device(device)).eval()
    return model, tt.Tokens(tokenizer, model.cfg.max_text_len), tt.preprocess_for(opts, start), untrained


if __name__ == "__main__":
    main()
