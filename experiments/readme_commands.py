"""Time the README's main commands exactly as written (no budget flags) and read their scores.

Issue 15's bar on an idle 2-core CPU: `verakit train --task sst2` <= 10 min with dev accuracy >= 0.82,
`verakit train --task e2e` <= 15 min with BLEU >= 50 on its evaluation sample, `verakit tune` (README
arguments) <= 30 min. Each command runs alone, one after another, with the machine's default threads;
results go to RUNS/readme_commands.json and a markdown table on stdout (docs/training.md quotes it).

    python experiments/readme_commands.py [--runs /work/runs_readme] [--only sst2 e2e tune]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def commands(runs: Path) -> dict[str, list[str]]:
    """The README's lines, with RUN_DIRs under `runs` (the README writes them under runs/)."""
    return {
        "sst2": ["verakit", "train", "--task", "sst2", "--data-dir", str(DATA / "glue" / "SST-2"),
                 "--out", str(runs / "sst2")],
        "e2e": ["verakit", "train", "--task", "e2e", "--data-dir", str(DATA / "e2e"), "--out", str(runs / "e2e")],
        "tune": ["verakit", "tune", "--task", "sst2", "--data-dir", str(DATA / "glue" / "SST-2"),
                 "--out", str(runs / "tune"), "--trials", "8", "--max-train-samples", "8000",
                 "--selection-rows", "500", "--eval-every", "50"],
    }


def score(name: str, out: Path) -> dict:
    if name == "tune":
        s = json.loads((out / "summary.json").read_text())
        best = s.get("best") or {}
        return {"metric": s.get("main_metric"), "value": best.get("value"), "trials": s.get("n_trials"),
                "states": s.get("states"), "split": s.get("split"),
                "dev": (best.get("dev") or {}).get(s.get("main_metric")),
                "dev_baseline": (best.get("dev_baseline") or {}).get(s.get("main_metric"))}
    m = json.loads((out / "metrics.json").read_text())
    main = "bleu" if name == "e2e" else m["main_metric"]
    return {"metric": main, "value": m["metric"].get(main), "steps": m.get("total_steps"), "rows": m.get("n_train"),
            "train_seconds": m.get("train_seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="/work/runs_readme")
    p.add_argument("--only", nargs="+", default=["sst2", "e2e", "tune"])
    args = p.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    record_path = runs / "readme_commands.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for name, cmd in commands(runs).items():
        if name not in args.only:
            continue
        out = Path(cmd[cmd.index("--out") + 1])
        shutil.rmtree(out, ignore_errors=True)
        print("$", shlex.join(cmd), flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, check=False).returncode
        wall = time.perf_counter() - start
        record[name] = {"command": shlex.join(cmd), "exit": code, "wall_seconds": round(wall, 1),
                        **(score(name, out) if code == 0 else {})}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record[name]), flush=True)
    print("\n| command | wall | score |\n|---|---|---|")
    for r in record.values():
        print(f"| `{r['command'].replace(str(DATA), '../shared/data')}` | {r['wall_seconds'] / 60:.1f} min | "
              f"{r.get('metric')} {r.get('value')} |")


if __name__ == "__main__":
    main()
