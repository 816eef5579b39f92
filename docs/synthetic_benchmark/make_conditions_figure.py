"""The figure of the synthetic benchmark's target conditions: a few target val scenes (rows) as
the daytime benchmark renders them and in fog, at night and in rain (columns). Rendered from
the generator itself (seed 0, 256x128), no data folder needed.

    python docs/synthetic_benchmark/make_conditions_figure.py --out docs/synthetic_benchmark/conditions.png
"""
import argparse

import numpy as np

from segadapt.data.io import write_png
from segadapt.data.synthetic import SynthParams, make_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    for i in args.images:
        row = [make_sample(SynthParams(seed=args.seed, condition=c), "target_val", i)[0]
               for c in (None, "fog", "night", "rain")]
        rows.append(np.concatenate(row, axis=1))
    write_png(args.out, np.concatenate(rows, axis=0))
    print(f"columns: daytime, fog, night, rain; written to {args.out}")


if __name__ == "__main__":
    main()
