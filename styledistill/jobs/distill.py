"""Ray job entrypoint for the distillation pipeline: the same arguments as `styledistill run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m styledistill.jobs.distill styledistill/configs/cluster.yaml --out s3://bucket/runs/v2

Inside a Ray job the driver joins the job's cluster (RAY_ADDRESS, else "auto") instead of starting one.
"""

from __future__ import annotations

import os
import sys

from styledistill.cli import app


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ray-address" not in argv:
        argv += ["--ray-address", os.environ.get("RAY_ADDRESS", "auto")]
    app(["run", *argv])


if __name__ == "__main__":
    main()
