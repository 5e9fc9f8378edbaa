"""``mira run``, ``mira compare``, ``mira tune`` and ``mira demo``.

Output folders. A run or a comparison never mixes its files with another's and never
damages an earlier result:

* every option is validated (config, algorithm options, merge method, seeds) before
  anything is written;
* a ``--out`` that exists and is not empty is refused unless ``--overwrite``;
* a new run into a missing or empty ``--out`` writes there directly, so a run that is
  killed is continued, exactly, with ``mira run --resume OUT`` (from its last checkpoint,
  or from round 0 when it was killed before the first one);
* with ``--overwrite`` the new run is built beside the old one, in ``.<name>.partial-<pid>``,
  and swapped in only when it has finished (``mira.io.replace_dir``: the old folder or the
  new one always exists). Until then the old run is untouched. If the new run is killed
  or fails after a checkpoint, the partial folder is kept and is itself a run directory:
  ``mira run --resume .<name>.partial-<pid>`` continues it and, when it finishes, swaps it
  into ``<name>``; the error message says where it is.

Building every new run in a temporary folder would protect nothing more (a missing or
empty ``--out`` holds no result) and would move a killed run away from where the user
looks for it, so only the replacing case pays for it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from mira.errors import MiraError

console = Console()
err_console = Console(stderr=True)
PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-\d+(?:-\d+)?$")  # .<name>.partial-<pid>[-<n>]

ALL_ALGORITHMS = "local,fedit,fedprox,ffa_lora,mira,centralized"


def _setup(quiet: bool) -> None:
    import torch

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))


def _summary_table(title: str, rows: list[tuple]) -> Table:
    t = Table(title=title)
    for col in ("algorithm", "mean local loss", "mean global loss", "bytes up", "bytes down"):
        t.add_column(col, justify="right" if col != "algorithm" else "left")
    for r in rows:
        t.add_row(*r)
    return t


def _fmt(e: dict, key: str) -> str:
    if e.get(key) is None:
        return "–"  # not computed (eval.global_loss)
    std = e.get(f"{key}_std")
    return f"{e[key]:.4f}" + (f" ± {std:.4f}" if std else "")


def check_out(out: Path, overwrite: bool) -> bool:
    """Refuse a ``--out`` that exists and is not empty unless ``overwrite``; True when it must be replaced."""
    from mira.io import clear_if_only_temp, is_empty_dir, recover_dir
    from mira.userfiles import check_out_folder

    check_out_folder(out)  # a file is never replaced by a run directory, even with --overwrite
    recover_dir(out)  # a replace that a kill interrupted: the old folder comes back first
    clear_if_only_temp(out)  # a run killed while writing its first file left only a temp file
    partials = unfinished_partials(out)
    note = (f"; an unfinished --overwrite run is in {partials[-1]} (mira run --resume {partials[-1]} "
            f"continues it)") if partials else ""
    if is_empty_dir(out):
        if note:
            logging.getLogger("mira").warning(note[2:])
        return False
    if not overwrite:
        unfinished = out.is_dir() and (out / "config.yaml").exists() and not (out / "summary.json").exists()
        hint = f" (an unfinished run: mira run --resume {out} continues it)" if unfinished else ""
        raise MiraError(f"{out} exists and is not empty{hint}; pass --overwrite to replace it{note}", where="--out")
    if note:
        logging.getLogger("mira").warning(note[2:])
    return True


def unfinished_partials(out: Path) -> list[Path]:
    """The resumable ``.<name>.partial-<pid>`` folders beside ``out`` (oldest first)."""
    if not out.parent.is_dir():
        return []
    found = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")
             and PARTIAL.match(p.name) and (p / "config.yaml").exists()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def partial_dir(out: Path) -> Path:
    """``.<name>.partial-<pid>`` beside ``out`` (a free name)."""
    path, n = out.parent / f".{out.name}.partial-{os.getpid()}", 1
    while path.exists():
        n += 1
        path = out.parent / f".{out.name}.partial-{os.getpid()}-{n}"
    return path


def _after_failure(out: Path, resumed: bool, existed: bool, say: bool = True) -> None:
    """A run stopped by an error or a signal: keep what can be resumed and say where (unless not
    ``say``: the error says it); remove the rest. A resumed run is left as it is (its folder is the
    one the user named)."""
    from mira.federated.engine import CHECKPOINT

    if resumed:
        return
    if (out / CHECKPOINT).exists():
        if say:
            err_console.print(f"the unfinished run is in {out}: mira run --resume {out} continues it",
                              highlight=False, soft_wrap=True, markup=False)
    elif not existed:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():  # an empty --out that this run started to fill: empty it again
        for entry in out.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def run_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config (default: the embedded demo config)"),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (must be new or empty)"),
            set_: List[str] = typer.Option([], "--set", help="override a config field, e.g. federation.rounds=5"),
            resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory"),
            overwrite: bool = typer.Option(False, "--overwrite",
                                           help="replace a non-empty --out, once the new run has finished"),
            allow_changed: List[str] = typer.Option(
                [], "--allow-changed", help="with --resume: accept a changed config or data field (or section) "
                                            "that you know does not matter, e.g. eval.batch_size"),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars")):
    """Run one federated algorithm and write a run directory.

    ``--resume DIR`` continues the run with DIR's own ``config.yaml`` (and ``--set``), checked against
    the fingerprint in its checkpoint: a field that changed (a config field, a data or model file) is
    refused unless named in ``--allow-changed``; ``federation.rounds`` may grow."""
    from mira.config import load_config
    from mira.federated.engine import Engine, RunStopped, Workspace
    from mira.io import recover_dir, replace_dir
    from mira.report.progress import make_progress

    _setup(quiet)
    target = None  # the folder this run replaces when it finishes (--overwrite)
    if allow_changed and resume is None:
        raise MiraError("--allow-changed only applies to --resume", where="--allow-changed")
    if resume is not None:
        if overwrite:
            raise MiraError("--resume continues a run in place; it takes no --overwrite", where="--overwrite")
        if config is not None or out is not None:
            raise MiraError(f"it continues the run with its own config ({resume}/config.yaml) and takes no "
                            f"{'CONFIG' if config is not None else '--out'} (change a field with --set, e.g. "
                            "--set federation.rounds=20)", where="--resume")
        recover_dir(resume)
        if not (resume / "config.yaml").exists():
            raise MiraError(f"{resume} is not a mira run directory (no config.yaml)", where="--resume")
        cfg, _ = load_config(resume / "config.yaml", set_)
        out = resume
        m = PARTIAL.match(resume.resolve().name)
        if m:  # the partial folder of a `run --overwrite`: it replaces <name> when it finishes
            target = resume.resolve().parent / m.group("name")
    else:
        cfg, _ = load_config(config, set_)
        out = out or Path("runs") / cfg.algorithm.name
        if check_out(out, overwrite):
            target, out = out, partial_dir(out)
    if cfg.privacy.secure_aggregation is not None:  # before loading anything (the Engine refuses it too)
        from mira.federated.flower.secagg import refuse_in_process

        refuse_in_process()
    with make_progress(quiet) as progress:
        ws = Workspace.load(cfg, progress.log)
        engine = Engine(ws, cfg, out, quiet)
        existed = out.exists()
        try:
            summary = engine.run(resume=resume is not None, progress=progress, allow_changed=allow_changed)
        except RunStopped:  # its message says what was kept and how to continue
            _after_failure(out, resume is not None, existed, say=False)
            raise
        except BaseException:
            _after_failure(out, resume is not None, existed)
            raise
    if target is not None:
        replace_dir(out, target)
        out = target
    if not quiet:
        console.print(_summary_table(f"{cfg.algorithm.name} after {summary['rounds']} rounds", [
            (summary["algorithm"], f"{summary['mean_local_test_loss']:.4f}", _fmt(summary, "mean_global_test_loss"),
             f"{summary['bytes_up']:,}", f"{summary['bytes_down']:,}")]))
        console.print(f"run directory: {out}")


def _seed_list(seeds: str) -> list[int]:
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise MiraError(f"seeds must be integers, got {seeds!r}", where="--seeds") from None
    if not seed_list:
        raise MiraError("no seed given", where="--seeds")
    if len(set(seed_list)) != len(seed_list):
        raise MiraError(f"a seed appears twice in {seeds!r}", where="--seeds")
    return seed_list


def compare_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config (default: the embedded demo config)"),
                algorithms: Optional[str] = typer.Option(
                    None, "--algorithms", "-a",
                    help=f"comma-separated; options after a colon, e.g. mira:graph=similarity (default {ALL_ALGORITHMS})"),
                out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="must be new or empty"),
                seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds, e.g. 0,1,2 (default 0)"),
                set_: List[str] = typer.Option([], "--set"),
                baseline: Optional[str] = typer.Option(
                    None, "--baseline", help="paired differences and per-client wins vs this algorithm "
                                             "(default: fedit when compared)"),
                resume: Optional[Path] = typer.Option(
                    None, "--resume", help="continue the interrupted comparison in this folder (finished runs are kept)"),
                overwrite: bool = typer.Option(False, "--overwrite",
                                               help="replace a non-empty --out, once the comparison has finished"),
                quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Run several algorithms on identical data, model and seeds; write comparison.{json,md,png}."""
    from mira.config import load_config
    from mira.report.progress import make_progress

    _setup(quiet)
    if resume is not None:
        given = [flag for flag, v in (("CONFIG", config), ("--algorithms", algorithms), ("--seeds", seeds),
                                      ("--set", set_), ("--baseline", baseline), ("--overwrite", overwrite)) if v]
        if given:
            raise MiraError(f"--resume continues the comparison as it was started (its {resume}/comparison.json); "
                            f"it takes no {', '.join(given)}", where="--resume")
        with make_progress(quiet) as progress:
            result = _resume_compare(resume, progress)
        _print_comparison(result, resume, quiet)
        return
    cfg, _ = load_config(config, set_)
    specs = _split_specs(ALL_ALGORITHMS if algorithms is None else algorithms)
    if not specs:
        raise MiraError(f"no algorithm given in {algorithms!r} (e.g. -a fedit,mira; leave out -a for all of "
                        f"{ALL_ALGORITHMS})", where="--algorithms")
    seed_list = _seed_list("0" if seeds is None else seeds)
    with make_progress(quiet) as progress:
        result = _compare_into(cfg, specs, out, seed_list, overwrite, progress, baseline=baseline)
    _print_comparison(result, out, quiet)


def _resume_compare(folder: Path, progress) -> dict:
    """Continue the comparison in ``folder`` from its ``comparison.json`` (config, specs, seeds, baseline)."""
    import json

    from mira.config import validate
    from mira.federated.compare import STATE, compare

    path = folder / STATE
    if not path.exists():
        raise MiraError(f"{folder} holds no comparison ({STATE} not found)", where="--resume")
    try:
        state = json.loads(path.read_text())
        cfg = validate(state["config"], str(path))
        specs, seeds = list(state["specs"]), [int(s) for s in state["seeds"]]
        vary_data, baseline = bool(state.get("vary_data", True)), state.get("baseline")
    except (KeyError, TypeError, ValueError) as e:
        raise MiraError(f"{path} is not a resumable comparison (written by an older mira, or damaged: "
                        f"{type(e).__name__}: {e})", where="--resume") from None
    return compare(cfg, specs, folder, seeds, progress, progress.log, vary_data=vary_data, baseline=baseline,
                   resume=True)


def _compare_into(cfg, specs: list[str], out: Path, seeds: list[int], overwrite: bool, progress,
                  baseline: str | None = None) -> dict:
    """``compare`` into ``out``: refused when not empty, unless ``overwrite``; then built beside it and
    swapped in at the end (a failed replacement is removed, the old one stays). Into a new or empty
    ``out`` it writes directly, and a failure keeps the run folders of the algorithms that finished
    and the partial ``comparison.json``: ``mira compare --resume OUT`` continues it."""
    from mira.federated.compare import check_specs, compare
    from mira.io import make_temp_dir, replace_dir

    check_specs(cfg, specs, seeds, baseline=baseline)  # every algorithm, option and setup, before anything is written
    if not check_out(out, overwrite):
        return compare(cfg, specs, out, seeds, progress, progress.log, baseline=baseline, checked=True)
    build = make_temp_dir(out)
    try:
        result = compare(cfg, specs, build, seeds, progress, progress.log, baseline=baseline, checked=True)
        replace_dir(build, out)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return result


def _split_specs(text: str) -> list[str]:
    """Split on commas that are not inside an option list (``mira:graph=x,lambda=1`` stays whole)
    nor inside brackets (``flora:lora.ranks=[4,8,16]`` stays whole)."""
    from mira.federated.compare import split_top

    specs: list[str] = []
    for part in split_top(text):
        part = part.strip()
        if not part:
            continue
        if specs and ":" in specs[-1] and "=" in part and ":" not in part:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def _print_comparison(result: dict, out: Path, quiet: bool) -> None:
    if quiet:
        return
    rows = [(label, _fmt(e, "mean_local_test_loss"), _fmt(e, "mean_global_test_loss"), f"{int(e['bytes_up']):,}",
             f"{int(e['bytes_down']):,}") for label, e in result["algorithms"].items()]
    console.print(_summary_table("comparison", rows))
    paired = result.get("paired") or {}
    for label, e in (paired.get("algorithms") or {}).items():
        c = e["clients"]
        console.print(f"{label} − {paired['baseline']}: local {e['local']['mean']:+.4f} ± {e['local']['ci95']:.4f}, "
                      + (f"global {e['global']['mean']:+.4f} ± {e['global']['ci95']:.4f}; " if "global" in e else "")
                      + "clients better/tied/worse "
                      f"{c['wins']}/{c['ties']}/{c['losses']}", highlight=False)
    console.print(f"written: {out}/comparison.json, comparison.md, comparison.png, loss_curves.png")


def tune_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config (default: the embedded demo config)"),
             algorithm: str = typer.Option("mira", "--algorithm", "-a",
                                           help="the algorithm to tune, options after a colon (mira:graph=similarity)"),
             grid: List[str] = typer.Option([], "--grid", help="KEY=LIST (a YAML list), e.g. 'algorithm.lambda=[0.5,2,8]'; "
                                                               "repeat for a Cartesian grid"),
             seeds: str = typer.Option("0", "--seeds", help="comma-separated seeds, e.g. 0,1,2"),
             set_: List[str] = typer.Option([], "--set"),
             out: Path = typer.Option(Path("runs/tune"), "--out", "-o", help="must be new or empty"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out, once finished"),
             quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Grid-search hyper-parameters on a validation split (never the test split); write tune.{json,md}."""
    from mira.config import load_config
    from mira.federated.tune import tune
    from mira.io import make_temp_dir, replace_dir
    from mira.report.progress import make_progress

    _setup(quiet)
    cfg, _ = load_config(config, set_)
    seed_list = _seed_list(seeds)
    replacing = check_out(out, overwrite)
    target = out
    if replacing:
        out = make_temp_dir(target)
    try:
        with make_progress(quiet) as progress:
            result = tune(cfg, algorithm, grid, seed_list, out, progress, progress.log)
        if replacing:
            replace_dir(out, target)
    except BaseException:  # (every point is validated before anything is written)
        if replacing:
            shutil.rmtree(out, ignore_errors=True)  # the old --out stays as it was
        raise
    best = result["best"]
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False, markup=False)
    if not quiet:
        t = Table(title=f"tune {result['algorithm']} (selected on validation loss)")
        for col in ("point", *result["grid"], "mean val loss", "mean local test loss (not used)"):
            t.add_column(col, justify="right")
        for p in result["points"]:
            tests = list(p["test_not_used_for_selection"].values())
            t.add_row(str(p["index"]) + (" *" if best and p["index"] == best["index"] else ""),
                      *[str(p["params"][k]) for k in result["grid"]], f"{p['mean_val_loss']:.4f}",
                      f"{sum(x['mean_local_test_loss'] for x in tests) / len(tests):.4f}")
        console.print(t)
        console.print(f"written: {target}/tune.json, tune.md")
    console.print(f"chosen (lowest mean validation loss): {best['command_line']}", highlight=False, markup=False)


def demo_cmd(out: Path = typer.Option(Path("runs/demo"), "--out", "-o"),
             quiet: bool = typer.Option(False, "--quiet", "-q")):
    """The embedded default end to end: mira's own 8-task suite and demo model, all algorithms.

    Replaces its own earlier output in ``--out`` (so ``make demo`` can run again)."""
    from mira.config import load_config
    from mira.report.progress import make_progress

    _setup(quiet)
    cfg, _ = load_config(None)
    specs = ALL_ALGORITHMS.split(",") + ["mira:graph=similarity"]
    with make_progress(quiet) as progress:
        progress.log("data: mira's synthetic 8-task suite (add/sub, reverse chars/words, upper/lower, sort digits/letters)")
        progress.log("model: builtin:demo, a 3-layer Llama that mira builds and pre-trains on first use (cached)")
        result = _compare_into(cfg, specs, out, [cfg.seed], True, progress)
    _print_comparison(result, out, quiet)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("compare")(compare_cmd)
    app.command("tune")(tune_cmd)
    app.command("demo")(demo_cmd)
