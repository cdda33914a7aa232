"""Built-in plugin: the job scheduler starts with the app runtime; ``flask immutant jobs``; status."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from ..cli import echoed_as_json_or_empty, one_line_errors, state_and_store
from ..cli_table import echo_table
from ..hookspecs import hookimpl
from ..records import decoded, read_records
from ..settings import Setting, to_bool

if TYPE_CHECKING:
    import redis

    from ..protocols import RuntimeView
    from ..state import ImmutantState

FLAG = "IMMUTANT_JOBS"


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [Setting(FLAG, True, to_bool, "Run the jobs apps schedule with flask_immutant.jobs.", "bool")]


@hookimpl(trylast=True)
def immutant_runtime_started(runtime: RuntimeView) -> None:
    from .registry import registry  # here: croniter loads in a runtime, not in every CLI command

    registry(runtime.app).activate()


@hookimpl(trylast=True)
def immutant_runtime_stopping(runtime: RuntimeView) -> None:
    from .registry import registry

    registry(runtime.app).shutdown()


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(jobs)


@hookimpl(trylast=True)
def immutant_status(state: ImmutantState, store: redis.Redis) -> dict[str, Any]:
    return {"jobs": job_status(state, store)}


def job_status(state: ImmutantState, store: redis.Redis) -> list[dict[str, Any]]:
    """Every stored singleton job of every app in the cluster, with its scheduler's holder."""
    apps = sorted({key.split(":")[-2] for key in map(decoded, store.scan_iter(match=state.keys.jobs_schedule("*"),
                                                                              count=200)) if key is not None})

    def rows_of(app: str, _: Any) -> list[dict[str, Any]]:
        from ..cluster.lease import read_holder
        from .store import JobStore  # here: only when some app has jobs (status reads none otherwise)

        holder = read_holder(store, state.keys, f"scheduler:{app}")
        rows = JobStore(store, state.keys, app).listing()
        return [{**row, "holder": holder.node if holder else None} for row in rows]

    by_app = read_records({app: None for app in apps}, "job schedule", rows_of)
    return [row for app in apps for row in by_app.get(app, [])]


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


@click.command(help="Show scheduled jobs: name, spec, next fire, last fire, holder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@one_line_errors
def jobs(ctx: click.Context, as_json: bool) -> None:
    with state_and_store(ctx) as (state, store):
        rows = job_status(state, store)
    if echoed_as_json_or_empty(rows, as_json, "no scheduled jobs"):
        return
    echo_table(("JOB", "SPEC", "NEXT", "LAST", "FIRED", "HOLDER", "ERROR"),
               ([f"{r['app']}.{r['name']}", r["spec"], _when(r["next_fire"]), _when(r["last_fire"]), r["fired"],
                 r["holder"], r["last_error"]] for r in rows), right={"FIRED"})
