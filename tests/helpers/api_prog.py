"""Run by tests/test_api.py, serially or under `mpiexec -n 2`: one use of the Python API per
mode, each rank writing what it got to OUT/<mode>-rank<R>.json (and .npy arrays) for the test
to compare across ranks and launches.

    mpiexec -n 2 python tests/helpers/api_prog.py records OUT DATA
    python tests/helpers/api_prog.py evalpredict OUT DATA CHECKPOINT

Modes: records (fit on arrays: the FitResult), inplace (a Network passed to fit, rank 1's
parameters perturbed first), preempt (fit until a signal, then fit again with resume="auto"),
evalpredict (load, evaluate, predict), bad (fit with an unknown and an invalid option), split
(arrays with val_fraction), apart (each rank passes other arrays), threads (BLAS threads before
and after the API's calls).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np

import distbp
from distbp.errors import SetupRefused, UsageError, env_rank

RANK = env_rank()
# The tiny model of tests/helpers/trainruns.py (TINY), as fit's keyword options.
OPTIONS = {"layers": [8, 16, 3], "activation": "tanh", "seed": 3, "lr": 0.1, "dtype": "float64",
           "batch_size": 16, "check_every": None, "collective_timeout": 60}


def rows(path: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["x"][()], f["y"][()]


def dump(out: Path, mode: str, **values) -> None:
    (out / f"{mode}-rank{RANK}.json").write_text(json.dumps(values, default=str))


def records(out: Path, data: str) -> None:
    x, y = rows(data)
    result = distbp.fit(None, x[:48], y[:48], x_val=x[48:], y_val=y[48:], steps=12,
                        run_dir=str(out / "run"), record_every=2, log_every=4, **OPTIONS)
    dump(out, "records", records=result.records, exit_code=result.exit_code,
         checkpoint=result.checkpoint)


def inplace(out: Path, data: str) -> None:
    x, y = rows(data)
    net = distbp.Network([8, 16, 3], activation="tanh", seed=7, dtype="float64")
    initial = net.params.copy()
    if RANK == 1:  # fit must start every rank from rank 0's parameters
        net.params += 1.0
    options = {k: v for k, v in OPTIONS.items() if k not in ("layers", "activation", "dtype")}
    result = distbp.fit(net, x, y, steps=6, run_dir=str(out / "run"), standardize=True,
                        **options)
    np.save(out / f"inplace-rank{RANK}.npy", net.params)
    np.save(out / f"initial-rank{RANK}.npy", initial)
    dump(out, "inplace", same_object=result.network is net, checkpoint=result.checkpoint,
         preprocess=sorted(net.preprocess))


def preempt(out: Path, data: str) -> None:
    x, y = rows(data)
    codes = []
    for _ in range(2):  # the second call continues the preempted run
        result = distbp.fit(None, x, y, steps=600, run_dir=str(out / "run"), resume="auto",
                            log_every=1, checkpoint_every=100000, **OPTIONS)
        codes.append(result.exit_code)
    dump(out, "preempt", codes=codes, checkpoint=result.checkpoint)


def evalpredict(out: Path, data: str, ckpt: str) -> None:
    x, y = rows(data)
    net = distbp.load(ckpt)
    scores = distbp.evaluate(net, x, y, batch_size=8)
    np.save(out / f"predict-rank{RANK}.npy", distbp.predict(net, x, batch_size=8))
    dump(out, "evalpredict", loss=float(scores["loss"]), accuracy=float(scores["accuracy"]),
         samples=scores["samples"])


def bad(out: Path, data: str) -> None:
    x, y = rows(data)
    got = []
    for options in ({"learning_rate": 0.1}, {"batch_size": 0}):
        try:
            distbp.fit([8, 16, 3], x, y, steps=2, run_dir=str(out / "run"), **options)
            got.append(None)
        except UsageError as e:
            got.append({"type": type(e).__name__, "setup_refused": isinstance(e, SetupRefused),
                        "message": str(e)})
    dump(out, "bad", errors=got)


def split(out: Path, data: str) -> None:
    x, y = rows(data)
    result = distbp.fit(None, x, y, steps=8, run_dir=str(out / "run"), val_fraction=0.25,
                        **OPTIONS)
    dump(out, "split", records=result.records)


def apart(out: Path, data: str) -> None:
    x, y = rows(data)
    mine = slice(0, 32) if RANK == 0 else slice(32, 64)  # a Horovod habit: each its own part
    try:
        distbp.fit(None, x[mine], y[mine], steps=4, run_dir=str(out / "run"), **OPTIONS)
        got = None
    except UsageError as e:
        got = {"setup_refused": isinstance(e, SetupRefused), "message": str(e)}
    dump(out, "apart", error=got)


def threads(out: Path, data: str) -> None:
    from threadpoolctl import threadpool_info

    def now() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info()]

    x, y = rows(data)
    before = now()
    result = distbp.fit(None, x, y, steps=2, run_dir=str(out / "run"), **{**OPTIONS,
                                                                        "threads": 1})
    after_fit = now()
    distbp.evaluate(result.network, x, y)
    dump(out, "threads", before=before, after_fit=after_fit, after_evaluate=now())


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    globals()[mode](Path(out), *rest)
