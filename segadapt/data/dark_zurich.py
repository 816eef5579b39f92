"""Kind ``dark_zurich``: Dark Zurich (Sakaridis et al., ICCV 2019), as downloaded::

    <root>/rgb_anon/<split>/<condition>/<sequence>/<frame>_rgb_anon.png
    <root>/gt/val/night/<sequence>/<frame>_gt_labelTrainIds.png      (_gt_labelIds.png also read)

train holds day, night and twilight without labels (the UDA target is its night part,
the default condition); val (50 night images) is the only labelled split; test's labels
are not public (its benchmark server scores it), so results here are on val.
Sample names are ``<condition>/<sequence>/<frame>``.
"""
from __future__ import annotations

from pathlib import Path

from segadapt.data.acdc import ConditionDataset
from segadapt.registry import DATASETS


@DATASETS.register("dark_zurich")
class DarkZurichDataset(ConditionDataset):
    kind = "dark_zurich"
    display = "Dark Zurich"
    conditions = ("day", "night", "twilight")
    default_condition = "night"
    labelled_splits = ("val",)
    unlabelled_note = "has no labels here (val is the labelled split; test is scored by the benchmark server)"

    def _cond_dir(self, top: str, condition: str) -> Path:
        return self.root / top / self.split / condition
