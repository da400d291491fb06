"""MLflow mirror throughput: how fast stored layer-rows reach a real ``mlflow server`` at the default budget.

    python bench/mlflow_mirror.py                  # 1 run, 50 layers x 1,000 steps
    python bench/mlflow_mirror.py --layers 200 --steps 500

Ingests the run into a fresh SQLite collector database (in-process), then calls the mirror's scheduler job
until the run's cursor reaches its last step, against a real MLflow server on a loopback port. Prints the
layer-rows and MLflow metrics per second, and how many metric keys the run got in MLflow (the budget).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the real-server fixtures

from sqlalchemy import select

from layerwatch_server.core.batch import Batch
from layerwatch_server.core.config import Settings
from layerwatch_server.mirrors import mlflow_mirror, source
from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.ingest import Ingestor
from layerwatch_server.storage.migrations import upgrade
from layerwatch_server.storage.models import Run
from tests.service.batches import make_batch
from tests.service.mlflow_server import running_mlflow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db = f"sqlite:///{tmp / 'lw.db'}"
        upgrade(db)
        engine = make_engine(db)
        ingestor = Ingestor(engine)
        for start in range(0, args.steps, 10):
            ingestor.write(
                Batch.model_validate(make_batch("mirror", steps=range(start, start + 10), n_layers=args.layers))
            )
        (tmp / "mlflow").mkdir()
        with running_mlflow(tmp / "mlflow") as uri:
            mirror = mlflow_mirror.from_settings(Settings(db_url=db, mlflow_tracking_uri=uri))
            assert mirror is not None
            start_t = time.perf_counter()
            while source.pending_runs(engine, 1):
                mirror.tick(engine)
            elapsed = time.perf_counter() - start_t
            with engine.connect() as conn:
                mlflow_run_id = conn.scalar(select(Run.mlflow_run_id))
            keys = len(mirror.client.get_run(mlflow_run_id).data.metrics)
        rows = args.layers * args.steps
        print(
            f"mirrored {args.steps} steps x {args.layers} layers in {elapsed:.1f} s: "
            f"{rows / elapsed:,.0f} layer-rows/s, "
            f"{mirror.metrics_total / elapsed:,.0f} MLflow metrics/s, {mirror.requests_total} log_batch requests, "
            f"{keys} metric keys in the MLflow run (budget: dead_frac and act_std per layer, grad_norm per param)"
        )


if __name__ == "__main__":
    main()
