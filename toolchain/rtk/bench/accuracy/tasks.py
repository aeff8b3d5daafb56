"""The zero-shot tasks rtk measures, as lm-eval-harness task configs.

Online (no $RTK_DATA_DIR) they are lm-eval's own tasks, reading the hub datasets. Offline, the files under
$RTK_DATA_DIR (see its README: official PIQA / ARC / BoolQ files, llama.cpp's HellaSwag text, llm-foundry's
WinoGrande) are converted once, deterministically, into the hub datasets' field layout in rtk's cache, and
the task configs shipped in `lm_eval_tasks/` (each `include`s lm-eval's own task file and changes only
where the data comes from) are written beside them with their two relative paths resolved:

    $RTK_CACHE_DIR/lm_eval/data/<task>/<split>.jsonl   converted records (+ source.json: what they came from)
    $RTK_CACHE_DIR/lm_eval/tasks/rtk_<task>.yaml       lm_eval --include_path $RTK_CACHE_DIR/lm_eval/tasks

Prompts, metrics and standard errors are therefore lm-eval's.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from rtk import pip_install
from rtk.errors import RtkError
from rtk.outdir import write_text_atomic

CONVERTER_VERSION = 1
SHIPPED = Path(__file__).with_name("lm_eval_tasks")


@dataclass(frozen=True)
class TaskSpec:
    name: str            # rtk's name (--tasks)
    lm_eval: str         # lm-eval's own task (online, hub dataset)
    title: str           # data set and split, for reports and model cards
    split: str           # the split lm-eval evaluates (key of data_files)
    files: tuple[str, ...]  # source files under $RTK_DATA_DIR
    convert: Callable[[list[Path]], list[dict]]
    docs: int            # documents in the split (the same in the local files and the hub's)
    acc_norm: bool       # lm-eval reports acc_norm for it (not for boolq, winogrande)

    @property
    def local(self) -> str:
        return f"rtk_{self.name}"


def _jsonl(path: Path) -> list[dict]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise RtkError(f"--tasks: {path}: line {n} is not JSON") from None
    return out


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _same_length(a: list, b: list, pa: Path, pb: Path) -> None:
    if len(a) != len(b):
        raise RtkError(f"--tasks: {pa} has {len(a)} records but {pb} {len(b)} labels")


def convert_piqa(paths: list[Path]) -> list[dict]:
    """valid.jsonl + valid-labels.lst -> baber/piqa fields (goal, sol1, sol2, label)."""
    recs, labels = _jsonl(paths[0]), _lines(paths[1])
    _same_length(recs, labels, *paths)
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)}
            for r, lab in zip(recs, labels)]


def convert_arc(paths: list[Path]) -> list[dict]:
    """AI2's jsonl (question.stem, question.choices[{text, label}]) -> allenai/ai2_arc fields."""
    out = []
    for r in _jsonl(paths[0]):
        ch = r["question"]["choices"]
        out.append({"id": r["id"], "question": r["question"]["stem"],
                    "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]},
                    "answerKey": r["answerKey"]})
    return out


def convert_boolq(paths: list[Path]) -> list[dict]:
    """SuperGLUE val.jsonl (label: bool) -> aps/super_glue boolq fields (label: 0 = False, 1 = True)."""
    return [{"question": r["question"], "passage": r["passage"], "idx": r["idx"], "label": int(bool(r["label"]))}
            for r in _jsonl(paths[0])]


def convert_hellaswag(paths: list[Path]) -> list[dict]:
    """llama.cpp's 6 lines per task (activity_label: context / gold / 4 endings) -> Rowan/hellaswag fields.
    The context is already preprocessed and ctx_a / ctx_b are merged: all of it goes to ctx_a."""
    lines = paths[0].read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise RtkError(f"--tasks: {paths[0]}: {len(lines)} lines, not 6 per task")
    out = []
    for i in range(0, len(lines), 6):
        label, sep, ctx = lines[i].partition(": ")
        if not sep:
            label, ctx = "", lines[i]
        out.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                    "endings": lines[i + 2: i + 6], "label": str(int(lines[i + 1]))})
    return out


def convert_winogrande(paths: list[Path]) -> list[dict]:
    """llm-foundry's partial-scoring records (context_options = text before the blank + each option,
    continuation = text after it) + official labels -> allenai/winogrande fields (sentence with "_",
    option1, option2, answer "1"/"2"). The text before the blank is the options' common prefix, cut
    after its last space; lm-eval's choices (prefix + option) and target (text after "_") are unchanged
    by where that cut falls."""
    recs, labels = _jsonl(paths[0]), _lines(paths[1])
    _same_length(recs, labels, *paths)
    out = []
    for n, (r, lab) in enumerate(zip(recs, labels), 1):
        a, b = r["context_options"]
        k = len(os.path.commonprefix([a, b]))
        cut = a.rfind(" ", 0, k) + 1 or k
        if lab not in ("1", "2") or int(r["gold"]) != int(lab) - 1:
            raise RtkError(f"--tasks: {paths[0]} record {n}: gold {r['gold']} disagrees with {paths[1]} ({lab})")
        out.append({"sentence": a[:cut] + "_ " + r["continuation"].strip(), "option1": a[cut:], "option2": b[cut:],
                    "answer": lab})
    return out


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", "piqa", "PIQA validation", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
             convert_piqa, 1838, True),
    TaskSpec("arc_easy", "arc_easy", "ARC-Easy test", "test", ("arc-easy/ARC-Easy-Test.jsonl",), convert_arc, 2376, True),
    TaskSpec("arc_challenge", "arc_challenge", "ARC-Challenge test", "test",
             ("arc-challenge/ARC-Challenge-Test.jsonl",), convert_arc, 1172, True),
    TaskSpec("boolq", "boolq", "BoolQ validation", "validation", ("boolq/val.jsonl",), convert_boolq, 3270, False),
    TaskSpec("hellaswag", "hellaswag", "HellaSwag validation", "validation", ("hellaswag/hellaswag_val_full.txt",),
             convert_hellaswag, 10042, True),
    TaskSpec("winogrande", "winogrande", "WinoGrande (winogrande_xl) validation", "validation",
             ("winogrande/winogrande_dev_llmfoundry.jsonl", "winogrande/dev-labels.lst"), convert_winogrande, 1267,
             False),
)}


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip().replace("-", "_") for t in spec.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise RtkError(f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; known: {', '.join(TASKS)}, all")
    return names


def cache_root() -> Path:
    from rtk.outdir import cache_dir

    return cache_dir() / "lm_eval"


def lm_eval_tasks_dir() -> Path:
    """The installed lm-eval's own task folder (what the shipped configs include)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RtkError(f"--tasks: lm-eval is not installed ({pip_install('eval')}, i.e. lm-eval[api]==0.4.13)")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


@dataclass(frozen=True)
class TaskSet:
    """What lm_eval is asked to run: its task names and the --include_path that defines them (None: lm-eval's
    own tasks on the hub datasets)."""

    names: tuple[str, ...]          # rtk's names
    lm_eval_names: tuple[str, ...]
    include_path: Optional[str]
    sources: dict                   # rtk name -> {title, files: [names], sha256, hub}

    def lm_eval_name(self, name: str) -> str:
        return self.lm_eval_names[self.names.index(name)]


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _convert(spec: TaskSpec, root: Path, data: Path) -> dict:
    paths = [root / f for f in spec.files]
    for p in paths:
        if not p.is_file():
            raise RtkError(f"--tasks {spec.name}: {p} not found (RTK_DATA_DIR={root})")
    digest = _sha256(paths)
    src = {"title": spec.title, "files": [Path(f).name for f in spec.files], "sha256": digest,
           "hub": spec.lm_eval, "converter_version": CONVERTER_VERSION}
    out_dir = data / spec.name
    meta = out_dir / "source.json"
    target = out_dir / f"{spec.split}.jsonl"
    if not (target.is_file() and meta.is_file() and json.loads(meta.read_text()) == src):
        try:
            recs = spec.convert(paths)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RtkError(f"--tasks {spec.name}: {paths[0]} is not in the expected format "
                           f"({type(exc).__name__}: {exc})") from None
        write_text_atomic(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        write_text_atomic(meta, json.dumps(src, indent=1))
    return {**src, "records": sum(1 for _ in target.open(encoding="utf-8"))}


def task_config(spec: TaskSpec, lm_tasks: Path, data: Path) -> str:
    """The shipped config of a task with `include` resolved in lm-eval's task folder and data_files in `data`."""
    shipped = SHIPPED / f"{spec.local}.yaml"
    cfg = yaml.safe_load(shipped.read_text())
    inc = lm_tasks / cfg["include"]
    if not inc.is_file():
        raise RtkError(f"--tasks {spec.name}: the installed lm-eval has no {cfg['include']} "
                       f"(rtk's task configs include lm-eval 0.4.13's own tasks)")
    cfg["include"] = str(inc)
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {k: str(data / v) for k, v in files.items()}
    return (f"# written by rtk from rtk/bench/accuracy/lm_eval_tasks/{shipped.name}: lm-eval's own "
            f"{spec.lm_eval} task reading {spec.title} from local files\n" + yaml.safe_dump(cfg, sort_keys=False))


def prepare(names: list[str], data_dir: Optional[str] = None) -> TaskSet:
    """The tasks as lm-eval will run them: from $RTK_DATA_DIR when set (converted, cached), else the hub."""
    root = data_dir if data_dir is not None else os.environ.get("RTK_DATA_DIR")
    specs = [TASKS[n] for n in names]
    if not root:
        return TaskSet(tuple(names), tuple(s.lm_eval for s in specs), None,
                       {s.name: {"title": s.title, "hub": s.lm_eval, "files": []} for s in specs})
    lm_tasks = lm_eval_tasks_dir()
    base = cache_root()
    data, tasks_dir = base / "data", base / "tasks"
    sources = {}
    for s in specs:
        sources[s.name] = _convert(s, Path(root), data)
        text = task_config(s, lm_tasks, data)
        path = tasks_dir / f"{s.local}.yaml"
        if not path.is_file() or path.read_text() != text:
            write_text_atomic(path, text)
    return TaskSet(tuple(names), tuple(s.local for s in specs), str(tasks_dir), sources)
