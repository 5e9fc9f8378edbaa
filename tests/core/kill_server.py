"""A fork server for the kill tests (``tests/core/test_kills.py``): imports mira, torch, transformers
and peft once (3 s on a small machine), then runs each ``mira`` command it is sent in a forked
child, a real process that the test SIGKILLs. After each child it imports what that child imported
(the child writes the list), so that the next ones start in a fraction of a second. Not a test module.

Protocol, one JSON object per line: in ``{"argv": [...], "env": {...}, "log": path}``; out
``{"pid": n}`` when the child has started, then ``{"pid": n, "code": c, "signal": s, "seconds": t}``
when it has ended (``code`` is None when it was killed by signal ``s``).
"""
import importlib
import json
import os
import sys
import time
import warnings


def _import_like(path: str) -> None:
    """Import the modules that a child listed in ``path`` (those that can be imported on their own)."""
    try:
        with open(path) as f:
            names = json.load(f)
        os.unlink(path)
    except (OSError, ValueError):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name not in sys.modules and not name.startswith("__"):
                try:
                    importlib.import_module(name)
                except BaseException:  # noqa: BLE001 - some only exist as a side effect of another
                    pass


def main() -> None:
    import mira.cli  # noqa: F401  (most of what a run imports, before the first fork)
    import mira.federated.cli  # noqa: F401
    import mira.federated.engine  # noqa: F401

    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: a `mira` command line
            code = 1
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                for k, v in job.get("env", {}).items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                from mira.cli import main as mira_main

                code = mira_main(job["argv"])
            except BaseException as e:  # noqa: BLE001
                print(f"kill_server child: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                try:
                    with open(job["log"] + ".modules.tmp", "w") as f:
                        json.dump(list(sys.modules), f)
                    os.replace(job["log"] + ".modules.tmp", job["log"] + ".modules")
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        _import_like(job["log"] + ".modules")
        result = {"pid": pid, "seconds": time.perf_counter() - t0,
                  "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                  "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
