"""`segadapt prepare`: one pass over a labelled dataset that checks its layout and
counts the pixels of every class in every label.

    segadapt prepare --kind gta5 --root /data/GTA5              # writes <root>/segadapt_class_stats.json
    segadapt prepare --kind cityscapes --root R --split train --check   # report only, writes nothing

The statistics file is what rare class sampling (method `daformer`) reads; for a
read-only root write it elsewhere with `--out FILE` and set `method.rcs.stats=FILE`.
Problems (missing labels, labels without images, image/label size mismatches,
unknown label ids, unreadable or truncated files: every image and label is
decoded in full, labels that cannot hold exact ids: JPEG or blended, see
`lossy_label_reason`) are listed and make the command exit with 2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

MAX_SHOWN = 20  # problems listed per kind


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="check a dataset layout and write the class statistics that rare class sampling needs")
    p.add_argument("--kind", required=True, choices=["gta5", "cityscapes", "synthia"])
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--split", default=None, help="cityscapes: train/val/test (default train); gta5/synthia: all")
    p.add_argument("--list-file", default=None, help="only the samples named in this file (relative to root)")
    p.add_argument("--check", action="store_true",
                   help="only report counts, problems and the class histogram; write nothing")
    p.add_argument("--out", default=None, help="statistics file (default: <root>/segadapt_class_stats.json)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="label-reading processes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- the scan
@dataclass
class ScanResult:
    kind: str
    root: Path
    images: int = 0
    labels: int = 0
    class_pixels: list = field(default_factory=list)  # per class
    class_images: list = field(default_factory=list)  # images holding the class
    entries: dict = field(default_factory=dict)  # cache key -> statistics entry
    problems: dict = field(default_factory=dict)  # kind of problem -> messages

    def problem(self, what: str, message: str) -> None:
        self.problems.setdefault(what, []).append(message)

    @property
    def num_problems(self) -> int:
        return sum(len(v) for v in self.problems.values())


class _ReadLabels:
    """Map-style dataset of (image, label) pairs; each item is checked and counted in a worker."""

    def __init__(self, dataset, pairs, num_classes):
        self.dataset, self.pairs, self.num_classes = dataset, pairs, num_classes

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        import numpy as np

        from ..data import io
        from ..data.labels import INVALID
        from ..data.rcs import label_class_counts
        from ..errors import DatasetError

        image, label = self.pairs[i]
        out = {"i": i, "error": None, "unknown": [], "counts": None, "label_wh": None, "image_wh": None,
               "lossy": None}
        try:
            raw = self.dataset._read_label_raw(label)
            out["label_wh"] = (raw.shape[1], raw.shape[0])
            # every pixel decoded (a header read passes a truncated file that later stops training)
            pixels = io.read_image(image)
            out["image_wh"] = (pixels.shape[1], pixels.shape[0])
            del pixels
        except DatasetError as e:
            out["error"] = str(e)
            return out
        out["lossy"] = lossy_label_reason(label, raw)
        lut = self.dataset._lut_for(label)
        mapped = lut[raw]
        invalid = mapped == INVALID
        if invalid.any():
            out["unknown"] = [int(v) for v in np.unique(raw[invalid])[:10]]
            mapped = np.where(invalid, 255, mapped)
        out["counts"] = label_class_counts(mapped, self.num_classes).tolist()
        out["bytes"] = os.path.getsize(label)
        return out


#: a clean id map changes id between two classes; lossy compression (JPEG) or a smooth
#: resize blends neighbouring ids, so an id change often passes through intermediate ids
LOSSY_BLEND_SHARE = 0.15
LOSSY_MIN_BLENDED = 100  # pixels: tiny labels never trip the rule on a handful of pixels


def lossy_label_reason(path, raw) -> Optional[str]:
    """Why the label map `raw` read from `path` cannot hold exact ids, or None.

    A JPEG file is lossy whatever its name. For any other file: across every 3-pixel
    run (rows and columns) whose ends differ, count the middle pixels whose id lies
    strictly between the ends' ids. Clean maps (Cityscapes, GTA5-style renders, the
    synthetic benchmark) stay under ~5% (three classes in a row, ordered by id); a
    JPEG-saved map is above 15% even at quality 95, as is a bilinearly resized one.
    Near-lossless JPEG (quality 100) may pass.
    """
    import numpy as np

    with open(path, "rb") as f:
        if f.read(3) == b"\xff\xd8\xff":
            return "is a JPEG file: lossy compression changes ids at every edge; save labels as PNG"
    ids = raw.astype(np.int32)
    blended = ends_differ = 0
    for a in (ids, ids.T):
        left, mid, right = a[:, :-2], a[:, 1:-1], a[:, 2:]
        blended += int(np.count_nonzero(((left < mid) & (mid < right)) | ((left > mid) & (mid > right))))
        ends_differ += int(np.count_nonzero(left != right))
    share = blended / max(ends_differ, 1)
    if blended >= LOSSY_MIN_BLENDED and share >= LOSSY_BLEND_SHARE:
        return (f"looks lossy-compressed or smoothly resized: {100 * share:.0f}% of its id changes pass through "
                f"an intermediate id (clean label maps: under 5%); re-export it losslessly (PNG, nearest resize)")
    return None


def _exists_in(listing_cache: dict, path: Path) -> bool:
    folder = path.parent
    if folder not in listing_cache:
        try:
            listing_cache[folder] = set(os.listdir(folder))
        except OSError:
            listing_cache[folder] = set()
    return path.name in listing_cache[folder]


def _label_files(ds) -> list[tuple[Path, str]]:
    """(label file, sample name it belongs to) for every label file in the layout."""
    folder = ds._label_folder()
    if folder is None or not folder.is_dir():
        return []
    out = []
    if ds.kind == "cityscapes":
        suffixes = ("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")
        for city in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(city.iterdir()):
                for suf in suffixes:
                    if f.name.endswith(suf):
                        out.append((f, f"{city.name}/{f.name[: -len(suf)]}"))
    else:
        out = [(f, f.name) for f in sorted(folder.iterdir())
               if f.suffix.lower() == ".png" and not f.name.startswith(".")]
    return out


def scan(kind: str, root: str, split: Optional[str] = None, list_file: Optional[str] = None, workers: int = 0,
         progress: bool = True) -> ScanResult:
    """Check the layout and count classes, reading every label once."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ..config import DatasetConfig
    from ..data.datasets import build_dataset
    from ..data.labels import NUM_CLASSES
    from ..data.rcs import stats_entry

    if split is None:
        split = "train" if kind == "cityscapes" else "all"
    # labels: false lists the images without failing on the first missing label
    ds = build_dataset(DatasetConfig(kind=kind, root=root, split=split, list_file=list_file, labels=False))
    res = ScanResult(kind=kind, root=ds.root, images=len(ds), class_pixels=[0] * NUM_CLASSES,
                     class_images=[0] * NUM_CLASSES)

    def rel(path) -> str:
        return Path(path).relative_to(ds.root).as_posix()

    seen: dict = {}
    pairs = []
    for name, (image, _) in zip(ds.names, ds.samples):
        cands = ds._label_candidates(name)
        label = next((c for c in cands if _exists_in(seen, c)), None)
        if label is None:
            res.problem("missing label", f"image {rel(image)} has no label {rel(cands[0])}")
        else:
            pairs.append((image, label))
    for label, name in _label_files(ds):
        image = ds._image_path(name)
        if not _exists_in(seen, image):
            res.problem("orphan label", f"label {rel(label)} has no image {rel(image)}")
    res.labels = len(pairs)

    loader = DataLoader(_ReadLabels(ds, pairs, NUM_CLASSES), batch_size=None, num_workers=workers)
    for item in tqdm(loader, total=len(pairs), desc="labels", disable=not progress, dynamic_ncols=True, leave=False):
        image, label = pairs[item["i"]]
        if item["error"] is not None:
            res.problem("unreadable", item["error"])
            continue
        if item["label_wh"] != item["image_wh"]:
            (lw, lh), (iw, ih) = item["label_wh"], item["image_wh"]
            res.problem("size mismatch", f"label {rel(label)} is {lw}x{lh} but image {rel(image)} is {iw}x{ih}")
        if item["lossy"]:
            res.problem("lossy label", f"label {rel(label)} {item['lossy']}")
        if item["unknown"]:
            ids = ", ".join(map(str, item["unknown"]))
            res.problem("unknown label ids", f"label {rel(label)} holds ids {ids}, not in the {kind} label map")
        for c, n in enumerate(item["counts"]):
            res.class_pixels[c] += n
            res.class_images[c] += n > 0
        res.entries[rel(label)] = stats_entry(item["counts"], item["bytes"])
    return res


# --------------------------------------------------------------------------- report
def histogram_table(class_pixels, class_images) -> str:
    """Two columns of `id name pixel-% images`."""
    from ..data.labels import CLASS_NAMES

    total = max(sum(class_pixels), 1)
    cells = [f"{c:2d} {CLASS_NAMES[c]:<13s} {100.0 * class_pixels[c] / total:6.2f}% {class_images[c]:7d}"
             for c in range(len(class_pixels))]
    half = (len(cells) + 1) // 2
    head = f"{'id':>2s} {'class':<13s} {'pixels':>7s} {'images':>7s}"
    lines = [f"{head}   |  {head}"]
    for a, b in zip(cells[:half], cells[half:] + [""]):
        lines.append(f"{a}   |  {b}" if b else a)
    return "\n".join(lines)


def report(res: ScanResult) -> str:
    """Counts, the class histogram, then the problems: the verdict (`verdict`) follows it."""
    lines = [f"{res.kind} {res.root}: {res.images} images, {res.labels} with a label",
             "class histogram (share of labelled pixels, images holding the class):",
             histogram_table(res.class_pixels, res.class_images)]
    if res.problems:
        lines.append(f"problems: {res.num_problems}")
        for what, msgs in res.problems.items():
            lines.append(f"  {what} ({len(msgs)}):")
            lines += [f"    {m}" for m in msgs[:MAX_SHOWN]]
            if len(msgs) > MAX_SHOWN:
                lines.append(f"    ... and {len(msgs) - MAX_SHOWN} more")
    return "\n".join(lines)


def problems_line(res: ScanResult) -> str:
    """The one-line verdict of a scan with problems (the command's last line)."""
    kinds = ", ".join(f"{what} {len(msgs)}" for what, msgs in res.problems.items())
    return f"{res.num_problems} problem(s) in {res.root} ({kinds}), listed above"


def run(args) -> int:
    from ..utils.files import ensure_writable
    from ..data.rcs import STATS_FILE, read_class_stats, write_class_stats
    from ..engine.run_folder import refuse_output_over_inputs
    from ..errors import ConfigError, DatasetError, write_error

    if args.out and not args.check:  # before the (long) scan
        refuse_output_over_inputs(args.out, [("--root", args.root), ("--list-file", args.list_file), (
            "--list-file", Path(args.root) / args.list_file if args.list_file else None)])
        ensure_writable(Path(args.out))  # a folder or a file in the way, a read-only disk
        try:
            read_class_stats(Path(args.out))
        except DatasetError:
            raise ConfigError(f"--out {args.out} exists and is not a class-statistics file: "
                              "choose another output") from None
    res = scan(args.kind, args.root, args.split, args.list_file, workers=max(0, args.workers),
               progress=not args.no_progress)
    print(report(res))
    # the verdict comes last, on one line: an error line when there are problems
    if res.problems:
        raise DatasetError(problems_line(res) + ("" if args.check else "; class statistics not written"))
    if args.check:
        print(f"problems: none ({res.images} images and {res.labels} labels checked)")
        return 0
    out = Path(args.out) if args.out else res.root / STATS_FILE
    try:
        images = read_class_stats(out)  # keep entries of other splits / list files
    except DatasetError:
        if args.out:
            raise
        images = {}  # the default cache name in the root: a broken cache is rebuilt
    images.update(res.entries)
    try:
        write_class_stats(out, images, args.kind, res.root)
    except OSError as e:  # e.g. a full disk: a failed write() names no file
        raise write_error(out, e) from None
    print(f"class statistics of {len(res.entries)} labels written to {out}")
    return 0
