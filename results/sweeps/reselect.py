"""The choice each True*Info sweep's rule makes from its grid points' *current* (re-judged) validation scores.

The sweeps below chose their strengths with the first embedded judge; their points were re-judged later
(`bench judge rejudge`). This applies the same rule (`bench.sweep.choose`, the fluency limits recorded in
`sweep.json`) to the re-judged points, without running anything: `python results/sweeps/reselect.py`.
"""

import json
from pathlib import Path

from bench.sweep import choose, format_value

HERE = Path(__file__).parent

for sweep_file in sorted(HERE.glob("*truthinfo/sweep.json")):
    sweep = json.loads(sweep_file.read_text())
    points = []
    for v in sweep["values"]:
        res = json.loads((sweep_file.parent / f"{sweep['param']}={format_value(v)}" / "results.json").read_text())
        points.append({"value": v, "folds": res["folds"], "metrics": res["metrics"]})
    limits = {int(k): v for k, v in sweep["chosen"]["fluency_limits"].items()}
    now = choose(points, sweep["metric"], limits)
    print(f"{sweep_file.parent.name}: chosen per fold then {sweep['chosen']['per_fold']}, "
          f"with the re-judged scores {now['per_fold']}")
