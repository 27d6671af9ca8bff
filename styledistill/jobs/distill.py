"""Ray job entrypoint for the distillation pipeline: the same arguments as `styledistill run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m styledistill.jobs.distill styledistill/configs/cluster.yaml --out s3://bucket/runs/v2

Inside a Ray job the driver joins the job's cluster (RAY_ADDRESS, else "auto") instead of starting one.

The config is a path or a URL (s3://, gs://, https://, any fsspec protocol installed): `--working-dir .`
uploads only files git does not ignore, so a config under a git-ignored folder (`runs/`) never reaches the
cluster; a URL, or a path inside the package (`styledistill/configs/...`, found in the installed package
when the working dir does not have it), always does.
"""

from __future__ import annotations

import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

from styledistill.io import uris

PACKAGE_PREFIX = "styledistill/"
NOT_UPLOADED = (
    "; under `ray job submit --working-dir .`, Ray uploads only the files git does not ignore (runs/ is "
    "git-ignored), so pass the config as a URL (s3://..., gs://..., https://...), keep it in a tracked "
    "folder, or set RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 on the machine that submits")


class ConfigNotFound(SystemExit):
    """The config is nowhere this driver can read it; the message names the likely cause."""


def resolve_config(arg: str) -> str:
    """A local path `styledistill run` can read for `arg`: a URL is copied to a temp file (its relative source
    paths would be relative to that file: give sources as URLs or absolute paths), a path inside the package
    falls back to the installed package, and a missing path fails with the reason."""
    if uris.is_url(arg):
        try:
            data = uris.read_bytes(arg)
        except FileNotFoundError:
            raise ConfigNotFound(f"error: config file not found: {arg}") from None
        folder = Path(tempfile.mkdtemp(prefix="styledistill-config-"))
        local = folder / (Path(arg.rstrip("/")).name or "config.yaml")
        local.write_bytes(data)
        return str(local)
    if Path(arg).exists():
        return arg
    if arg.startswith(PACKAGE_PREFIX):
        packaged = resources.files("styledistill").joinpath(arg[len(PACKAGE_PREFIX):])
        if packaged.is_file():
            return str(packaged)
    raise ConfigNotFound(f"error: config file not found: {arg} (working directory {os.getcwd()})"
                         + ("" if Path(arg).is_absolute() else NOT_UPLOADED))


def main(argv: list[str] | None = None) -> None:
    from styledistill.cli import app

    argv = list(sys.argv[1:] if argv is None else argv)
    # The first argument that is not an option (or an option's value) is the config.
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        if i and argv[i - 1] in ("--set", "-s", "--out", "-o", "--ray-address"):
            continue
        argv[i] = resolve_config(arg)
        break
    if "--ray-address" not in argv:
        argv += ["--ray-address", os.environ.get("RAY_ADDRESS", "auto")]
    app(["run", *argv])


if __name__ == "__main__":
    main()
