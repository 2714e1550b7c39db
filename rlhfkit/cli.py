"""The one ``rlhfkit`` command. Subcommands are the stages.

Every training stage takes the fields of its config (``rlhfkit/config.py``) as options, a
``--config`` YAML preset, and trailing ``key=value`` overrides:

    rlhfkit sft --model smollm2-135m-instruct --data demos.jsonl --out runs/sft lr=1e-5 epochs=2
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import typing
from typing import Optional

import typer
import yaml

from rlhfkit.config import STAGES, PipelineConfig, build_config, field_help
from rlhfkit.errors import UserError
from rlhfkit.evals.command import eval_command

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="rlhfkit: RLHF end to end — SFT, reward model from K-way rankings, PPO, the feedback loop.")


def friendly(fn):
    """Bad input is one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted: the latest checkpoint (if any) is intact; rerun with resume=true", err=True)
            raise typer.Exit(130)

    return wrapper


def _runner(stage: str):
    if stage == "sft":
        from rlhfkit.recipes.sft import train_sft as run
    elif stage == "rm":
        from rlhfkit.recipes.reward import train_reward_model as run
    elif stage == "pretrain":
        from rlhfkit.recipes.pretrain import train_pretrain as run
    elif stage == "ppo":
        from rlhfkit.recipes.ppo import train_ppo as run
    elif stage == "pipeline":
        from rlhfkit.recipes.pipeline import run_pipeline as run
    else:  # pragma: no cover
        raise ValueError(stage)
    return run


def _stage_command(stage: str, cls: type) -> None:
    """Register ``rlhfkit <stage>`` with one option per config field."""
    hints = typing.get_type_hints(cls)
    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--config", "-c", help="YAML preset (a path, or a bundled preset name).")),
        inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                          default=typer.Argument(None, help="key=value overrides, applied last.", show_default=False)),
    ]
    for name, default, help_text in field_help(cls):
        kind = hints[name]
        cli_type = kind if kind in (bool, int, float, str) else str  # lists/dicts: a YAML string
        opt_name = "--" + name.replace("_", "-")
        decl = [f"{opt_name}/--no-{name.replace('_', '-')}"] if kind is bool else [opt_name]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[cli_type],
                                        default=typer.Option(None, *decl, help=f"{help_text} [default: {default}]",
                                                             show_default=False)))

    def command(**kwargs):
        preset = kwargs.pop("config")
        overrides = kwargs.pop("overrides") or []
        for name, value in list(kwargs.items()):
            if value is not None and hints[name] in (list, dict):
                kwargs[name] = yaml.safe_load(value)
        cfg = build_config(cls, preset, overrides, **kwargs)
        result = _runner(stage)(cfg)
        typer.echo(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str, type(None)))}))

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = (cls.__doc__ or "").strip()
    command.__name__ = stage
    app.command(stage, help=command.__doc__, context_settings={"help_option_names": ["-h", "--help"]})(friendly(command))


for _stage, _cls in STAGES.items():
    _stage_command(_stage, _cls)
_stage_command("pipeline", PipelineConfig)


app.command("eval")(friendly(eval_command))  # its options live in rlhfkit/evals/command.py


@app.command("demo")
@friendly
def demo(out: str = typer.Option("runs/demo", help="Run directory."),
         overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of the pipeline config.")):
    """The main job: the RLHF pipeline on the embedded SmolLM2-135M-Instruct with the default settings."""
    from rlhfkit.recipes.pipeline import run_pipeline

    run_pipeline(build_config(PipelineConfig, None, overrides or [], out=out))


@app.command("serve")
@friendly
def serve(run: str = typer.Option("runs/demo", help="Run directory: its model versions are served; feedback.db lives there."),
          db: str = typer.Option("", help="Database URL (postgresql://user@host/db). Empty: SQLite (WAL) in the run directory."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="Port to listen on."),
          model: Optional[list[str]] = typer.Option(None, help="Extra model version, name=spec (repeatable)."),
          precision: str = typer.Option("auto", help="auto, bf16 or fp32."),
          max_new_tokens: int = typer.Option(256, help="Longest answer in chat, arena and API (tokens)."),
          rate_limit: float = typer.Option(30.0, help="Chat, arena and API requests per minute per user (0 = off)."),
          max_body_kb: int = typer.Option(256, help="Largest request body in KiB."),
          public_url: str = typer.Option("", help="Base URL for invite links (empty: http://host:port); an https "
                                                  "URL also makes cookies Secure and turns on HSTS."),
          login_failures: int = typer.Option(5, help="Failed sign-ins per name within --login-window-s before "
                                                     "sign-in is refused with 429 (0 = no limit)."),
          login_failures_per_address: int = typer.Option(20, help="Failed sign-ins per client address within "
                                                                  "--login-window-s (0 = no limit)."),
          login_window_s: float = typer.Option(300.0, help="Sign-in throttling window (seconds).")):
    """The web app: labeling queue, arena + leaderboard, chat, admin dashboard, OpenAI-compatible API."""
    from rlhfkit.config import ServeConfig
    from rlhfkit.web.app import serve as run_server

    run_server(ServeConfig(run=run, db=db, host=host, port=port, models=list(model or []), precision=precision,
                           max_new_tokens=max_new_tokens, rate_limit=rate_limit, max_body_kb=max_body_kb,
                           public_url=public_url, login_failures=login_failures,
                           login_failures_per_address=login_failures_per_address, login_window_s=login_window_s))


users = typer.Typer(help="People of the web app: invite links, API keys.", no_args_is_help=True)
app.add_typer(users, name="users")
_RUN = typer.Option("runs/demo", help="Run directory (its feedback.db).")
_DB = typer.Option("", help="Database URL; empty: SQLite in the run directory.")


_URL = typer.Option("", help="The server's base URL for the link. Empty: the one `rlhfkit serve` last used on "
                             "this store (its --public-url, else http://host:port).")
_NO_SERVER_YET = "http://127.0.0.1:8000"  # `rlhfkit serve`'s defaults


def _base_url(store, url: str) -> str:
    """The base of invite links: ``--url``, else what the server recorded in the store when it started."""
    if url:
        return url.rstrip("/")
    recorded = store.setting("base_url")
    if recorded:
        return recorded
    typer.echo(f"note: no server has run on this store yet; the link assumes {_NO_SERVER_YET} "
               "(pass --url to name another)", err=True)
    return _NO_SERVER_YET


@users.command("add")
@friendly
def users_add(name: str, run: str = _RUN, db: str = _DB,
              role: str = typer.Option("labeler", help="labeler or admin."), url: str = _URL):
    """Create a user and print their invite link (they choose a password there)."""
    from rlhfkit.feedback.store import Store

    store = Store.for_run(run, db or None)
    _, invite = store.create_user(name, role=role)
    typer.echo(f"{_base_url(store, url)}/invite/{invite}")


@users.command("invite")
@friendly
def users_invite(name: str, run: str = _RUN, db: str = _DB, url: str = _URL):
    """A fresh invite link for an existing user (also resets a forgotten password: using it signs
    them out everywhere)."""
    from rlhfkit.feedback.store import Store

    store = Store.for_run(run, db or None)
    typer.echo(f"{_base_url(store, url)}/invite/{store.new_invite(name)}")


@users.command("key")
@friendly
def users_key(name: str, run: str = _RUN, db: str = _DB):
    """Print a new API key of the user for the OpenAI-compatible API (Authorization: Bearer KEY)."""
    from rlhfkit.feedback.store import Store

    typer.echo(Store.for_run(run, db or None).new_api_key(name))


@app.command("convert")
@friendly
def convert(model: str = typer.Argument("smollm2-135m-instruct", help="A model spec (name, .gguf file, directory, hub id)."),
            out: Optional[str] = typer.Option(None, help="Also copy the converted Hugging Face directory here.")):
    """Resolve a model (converting a GGUF once into the cache) and print its Hugging Face directory."""
    import shutil

    from rlhfkit.models.loading import resolve_model_path

    path = resolve_model_path(model)
    if out:
        shutil.copytree(path, out, dirs_exist_ok=True)
        path = out
    typer.echo(path)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
