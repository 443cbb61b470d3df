"""Behaviour-unchanged check for refactors (issue 17): run the same `verakit` commands from two checkouts and
compare what users see: training and evaluation metrics, adapter files (every tensor's bytes and the metadata),
merged weights, generated text, served answers.

Each command runs as `python -m verakit.cli ...` with the checkout's src first on PYTHONPATH, one thread, on
tiny budgets (real MiniLM and SmolLM2, real GLUE/E2E rows, a tiny random ViT), so the whole capture takes a
few minutes. Timings, paths and environment fields are dropped before comparing; everything else must be equal.

    python experiments/behaviour_check.py capture --src /path/to/old/src --out /tmp/before.json
    python experiments/behaviour_check.py capture --src src --out /tmp/after.json
    python experiments/behaviour_check.py compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GLUE = SHARED / "glue"
# Keys whose values differ between two identical runs (clocks, machine, versions, paths).
VOLATILE = re.compile(r"(time|second|elapsed|date|environment|^env$|version|rss|memory|per_s|throughput|started|"
                      r"finished|host|wall|eta|duration|_s$|python|torch|platform|cpu|git|path|dir$|created)", re.I)
TINY = ["--max-train-samples", "96", "--max-eval-samples", "64", "--epochs", "1", "--batch-size", "16", "--seed", "0"]


def scrub(obj: Any, work: str) -> Any:
    """Drop volatile keys, replace the work folder in strings."""
    if isinstance(obj, dict):
        # PEFT writes target_modules from a set: its order changes from run to run (hash seed).
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else scrub(v, work)
                for k, v in obj.items() if not VOLATILE.search(str(k))}
    if isinstance(obj, list):
        return [scrub(v, work) for v in obj]
    if isinstance(obj, str):
        return obj.replace(work, "<W>")
    return obj


def file_digest(path: Path, work: str) -> dict[str, Any]:
    """A safetensors file as {metadata, sha256 per tensor, bytes}."""
    import torch
    from safetensors import safe_open

    out: dict[str, Any] = {"bytes": path.stat().st_size, "tensors": {}}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous().reshape(-1)
            out["tensors"][k] = [str(t.dtype), list(f.get_slice(k).get_shape()),
                                 hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()]
    parsed = {}
    for k, v in meta.items():
        try:
            parsed[k] = json.loads(v)
        except ValueError:
            parsed[k] = v
    out["metadata"] = scrub(parsed, work)
    return out


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "verakit.cli", *cmd], env=env, cwd=cwd, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def grouped_data(folder: Path) -> Path:
    """120 SST-2 training rows as a csv task with a `customer` column (3 groups), 45 dev rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = (GLUE / "SST-2" / "train.tsv").read_text().splitlines()[1:166]
    for split, part in (("train", rows[:120]), ("dev", rows[120:])):
        with (folder / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "customer"])
            for i, line in enumerate(part):
                text, label = line.rsplit("\t", 1)
                w.writerow([text, label, "abc"[i % 3]])
    return folder


def serve_answers(env: dict[str, str], cwd: Path, adapters: Path) -> dict[str, Any]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = adapters.parent / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "verakit.cli", "serve", "--model", "minilm", "--adapters",
                                 str(adapters), "--port",
                                 str(port), "--max-wait-ms", "50"], env=env, cwd=cwd, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        while "listening on" not in log.read_text():
            if proc.poll() is not None:
                return {"error": f"server exited {proc.returncode}", "log": log.read_text()[-3000:]}
            time.sleep(0.5)
        texts = ["a gorgeous, witty film", "dull and lifeless", "the plot goes nowhere but the actors shine"]
        out: dict[str, Any] = {}
        with httpx.Client(base_url=url, timeout=60) as c:
            for name in ("sst2", "mrpc", None):
                inputs = texts if name != "mrpc" else [[texts[0], texts[2]], [texts[1], texts[1]]]
                r = c.post("/v1/classify", json={"adapter": name, "inputs": inputs})
                out[f"classify {name}"] = [r.status_code, r.json()]
            r = c.post("/v1/classify", json={"adapter": "missing", "inputs": texts})
            out["classify missing"] = [r.status_code, r.json()]
            out["models"] = sorted(m["id"] for m in c.get("/v1/models").json().get("data", []))
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def capture(src: Path, out: Path, only: list[str] | None = None) -> None:
    work = Path(tempfile.mkdtemp(prefix="behaviour-"))
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    sys.path.insert(0, str(REPO / "tests"))
    from image_helpers import save_tiny_vit, write_images

    result: dict[str, Any] = {"src": str(src)}
    w = str(work)
    cmds: dict[str, list[str]] = {
        "sst2 vera": ["train", "--task", "sst2", "--data-dir", str(GLUE / "SST-2"), "--out", f"{w}/sst2", *TINY],
        "mrpc lora": ["train", "--task", "mrpc", "--data-dir", str(GLUE / "MRPC"), "--out", f"{w}/mrpc-lora",
                      "--method", "lora", *TINY],
        "mrpc vera": ["train", "--task", "mrpc", "--data-dir", str(GLUE / "MRPC"), "--out", f"{w}/mrpc", *TINY],
        "stsb full": ["train", "--task", "stsb", "--data-dir", str(GLUE / "STS-B"), "--out", f"{w}/stsb",
                      "--method", "full", *TINY],
        "rte peft-vera": ["train", "--task", "rte", "--data-dir", str(GLUE / "RTE"), "--out", f"{w}/rte",
                          "--method", "peft-vera", *TINY],
        "cola head full": ["train", "--task", "cola", "--data-dir", str(GLUE / "CoLA"), "--out", f"{w}/cola",
                           "--method", "head", *TINY],
        "grouped": ["train", "--task", "csv", "--data-dir", str(grouped_data(work / "grouped-data")), "--out",
                    f"{w}/grouped", "--group-column", "customer", "--epochs", "1", "--batch-size", "16"],
        "e2e vera": ["train", "--task", "e2e", "--data-dir", str(SHARED / "e2e"), "--out", f"{w}/e2e",
                     "--max-train-samples", "16", "--max-eval-samples", "8", "--gen-eval-samples", "2",
                     "--max-new-tokens", "12", "--epochs", "1", "--batch-size", "8", "--report-samples", "2"],
        "images vera": ["train", "--task", "images", "--data-dir", str(write_images(work / "img", n_train=8, n_test=4)),
                        "--model", str(save_tiny_vit(work / "vit", num_labels=3)), "--out", f"{w}/img-run",
                        "--epochs", "2", "--batch-size", "8"],
        "tune mrpc": ["tune", "--task", "mrpc", "--data-dir", str(GLUE / "MRPC"), "--out", f"{w}/tune",
                      "--trials", "2", "--max-train-samples", "64", "--max-eval-samples", "32", "--epochs", "1"],
        "eval sst2": ["eval", "--adapter", f"{w}/sst2/adapter.safetensors", "--max-eval-samples", "64"],
        "generate e2e": ["generate", "--adapter", f"{w}/e2e/adapter.safetensors", "--prompt",
                         "name[The Eagle], food[French], area[riverside]", "--max-new-tokens", "16", "--json"],
        "inspect sst2": ["inspect", f"{w}/sst2/adapter.safetensors"],
        "merge sst2": ["merge", "--adapter", f"{w}/sst2/adapter.safetensors", "--out", f"{w}/merged"],
    }
    for name, cmd in cmds.items():
        if only and name not in only and not (name.split()[0] in ("eval", "generate", "inspect", "merge", "serve")
                                              and any(o.split()[-1] == name.split()[-1] for o in only)):
            continue
        t0 = time.time()
        rc, text, err = run(cmd, env, work)
        entry: dict[str, Any] = {"rc": rc}
        print(f"{name}: rc {rc} in {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            entry["output"] = (text + err)[-3000:]
        if name.startswith(("eval", "generate")):
            entry["stdout"] = scrub(text.strip().splitlines()[-20:], w)
        if name.startswith("inspect"):
            entry["stdout"] = [ln for ln in scrub(text.splitlines(), w) if "version" not in ln]
        if cmd[0] in ("train", "tune"):
            run_dir = Path(cmd[cmd.index("--out") + 1])
            for f in sorted(run_dir.rglob("*.json")):
                if f.name != "config.json" or f.parent == run_dir:
                    try:
                        entry[str(f.relative_to(run_dir))] = scrub(json.loads(f.read_text()), w)
                    except ValueError:
                        entry[str(f.relative_to(run_dir))] = "unreadable"
            for f in sorted(run_dir.rglob("*.safetensors")):
                entry[str(f.relative_to(run_dir))] = file_digest(f, w)
        if name.startswith("merge"):
            for f in sorted((work / "merged").glob("*.safetensors")):
                entry[f.name] = file_digest(f, w)
        result[name] = entry
    if only and "serve" not in only:
        out.write_text(json.dumps(result, indent=1, sort_keys=True))
        return
    adapters = work / "served"
    adapters.mkdir()
    shutil.copy(work / "sst2" / "adapter.safetensors", adapters / "sst2.safetensors")
    shutil.copy(work / "mrpc" / "adapter.safetensors", adapters / "mrpc.safetensors")
    result["serve"] = serve_answers(env, work, adapters)
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")


def diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                diff(a[k], b[k], f"{where}/{k}", out)
    elif a != b:
        out.append(f"{where}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--src", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--only", nargs="*", help="command names to run (debugging), e.g. 'images vera' serve")
    d = sub.add_parser("compare")
    d.add_argument("before", type=Path)
    d.add_argument("after", type=Path)
    d.add_argument("--expected", nargs="*", default=[], metavar="REGEX",
                   help="paths allowed to differ (a change the refactor names), listed apart, e.g. samples")
    a = ap.parse_args()
    if a.cmd == "capture":
        capture(a.src, a.out, a.only)
        return 0
    before, after = json.loads(a.before.read_text()), json.loads(a.after.read_text())
    before.pop("src"), after.pop("src")
    out: list[str] = []
    diff(before, after, "", out)
    named = [x for x in out if any(re.search(e, x.split(":")[0]) for e in a.expected)]
    unexpected = [x for x in out if x not in named]
    if named:
        print(f"{len(named)} differences named by --expected:\n  " + "\n  ".join(named))
    print("\n".join(unexpected) if unexpected else f"otherwise identical: {len(before)} commands")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
