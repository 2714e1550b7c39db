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
import types
import typing

import typer
import yaml

from rlhfkit.config import STAGES, PipelineConfig, ServeConfig, build_config, choices, field_help
from rlhfkit.errors import UserError
from rlhfkit.evals.command import run_eval_command
from rlhfkit.evals.runner import EvalConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="rlhfkit: RLHF end to end — SFT, reward model from K-way rankings, PPO, the feedback loop.",
)


def friendly(fn):
    """Bad input is one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: the latest checkpoint (if any) is intact; rerun with resume=true", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _train(stage: str, cfg) -> dict:
    """Run a training stage (imported here: ``rlhfkit --help`` stays fast without torch)."""
    if stage == "sft":
        from rlhfkit.recipes.sft import train_sft as run
    elif stage == "rm":
        from rlhfkit.recipes.reward import train_reward_model as run
    elif stage == "pretrain":
        from rlhfkit.recipes.pretrain import train_pretrain as run
    elif stage == "dpo":
        from rlhfkit.recipes.dpo import train_dpo as run
    elif stage == "ppo":
        from rlhfkit.recipes.ppo import train_ppo as run
    elif stage == "a2c":
        from rlhfkit.recipes.a2c import train_a2c as run
    elif stage == "rloo":
        from rlhfkit.recipes.critic_free import train_rloo as run
    elif stage == "grpo":
        from rlhfkit.recipes.critic_free import train_grpo as run
    elif stage == "ilql":
        from rlhfkit.recipes.ilql import train_ilql as run
    elif stage in ("pipeline", "demo"):
        from rlhfkit.recipes.pipeline import run_pipeline as run
    else:  # pragma: no cover
        raise ValueError(stage)
    result = run(cfg)
    typer.echo(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str, type(None)))}))
    return result


def _serve(cfg: ServeConfig) -> None:
    from rlhfkit.web import require_web_extra

    require_web_extra()  # one clear line if `pip install 'rlhfkit[web]'` is missing
    from rlhfkit.web.app import serve as run_server

    run_server(cfg)


def _option(name: str, hint, default: str, help_text: str, flag: str | None) -> inspect.Parameter:
    """One typer option for a config field: bool -> --x/--no-x, list -> repeatable, Literal -> its choices."""
    allowed = choices(hint)
    origin = typing.get_origin(hint)
    optional = origin in (typing.Union, types.UnionType)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), str) if optional else hint
    opt_name = flag or "--" + name.replace("_", "-")
    if base is list:
        cli_type, decl = list[str], [opt_name]
    elif base is bool:
        cli_type, decl = bool, [f"{opt_name}/--no-{opt_name[2:]}"]
    else:
        cli_type, decl = (base if base in (int, float, str) else str), [opt_name]
    metavar = "[" + "|".join(map(str, allowed)) + "]" if allowed else {int: "INT", float: "FLOAT"}.get(cli_type, "TEXT")
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=cli_type | None,
        default=typer.Option(
            None,
            *decl,
            help=f"{help_text} [default: {default}]",
            metavar=None if cli_type is bool else metavar,
            show_default=False,
        ),
    )


def config_command(name: str, cls: type, run, preset: str | None = None, epilog: str | None = None) -> None:
    """Register ``rlhfkit <name>``: one option per field of ``cls`` (nested configs by ``key=value``),
    ``--config`` (a YAML preset; default ``preset``) and trailing ``key=value`` overrides; then
    ``run(cfg)``."""
    hints = typing.get_type_hints(cls)
    flags = {f.name: f.metadata.get("flag") for f in dataclasses.fields(cls)}
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=str | None,
            default=typer.Option(
                preset,
                "--config",
                "-c",
                help="YAML preset (a path, or a bundled preset name)." + (f" [default: {preset}]" if preset else ""),
                metavar="PRESET",
                show_default=False,
            ),
        ),
        inspect.Parameter(
            "overrides",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=list[str] | None,
            default=typer.Argument(
                None, help="key=value overrides, applied last.", metavar="KEY=VALUE...", show_default=False
            ),
        ),
    ]
    params += [_option(f, hints[f], default, text, flags[f]) for f, default, text in field_help(cls)]

    def command(**kwargs):
        preset_ = kwargs.pop("config")
        overrides = kwargs.pop("overrides") or []
        for field_name, value in list(kwargs.items()):
            if value is not None and hints[field_name] is dict:
                kwargs[field_name] = yaml.safe_load(value)
            elif value is not None and hints[field_name] is list:  # repeated, comma-separated or '[a, b]'
                kwargs[field_name] = [
                    x
                    for v in value
                    for x in (
                        yaml.safe_load(v) if v.startswith("[") else [p.strip() for p in v.split(",") if p.strip()]
                    )
                ]
        run(build_config(cls, preset_, overrides, **kwargs))

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = (cls.__doc__ or "").strip()
    command.__name__ = name
    app.command(name, help=command.__doc__, epilog=epilog, context_settings={"help_option_names": ["-h", "--help"]})(
        friendly(command)
    )


for _stage, _cls in STAGES.items():
    config_command(_stage, _cls, functools.partial(_train, _stage))
_NESTED = (
    "Stage settings are key=value overrides: sft.<setting>=..., rm.<setting>=..., ppo.<setting>=... "
    "(`rlhfkit sft --help`, `rlhfkit rm --help`, `rlhfkit ppo --help` list them), or mappings under "
    "sft:, rm:, ppo: in a --config YAML."
)
config_command("pipeline", PipelineConfig, functools.partial(_train, "pipeline"), epilog=_NESTED)
config_command(
    "demo",
    PipelineConfig,
    functools.partial(_train, "demo"),
    preset="demo",
    epilog="The main job: the pipeline with the demo's recipe (rlhfkit/presets/demo.yaml). " + _NESTED,
)
config_command("serve", ServeConfig, _serve)
config_command("eval", EvalConfig, run_eval_command)


users = typer.Typer(help="People of the web app: invite links, API keys.", no_args_is_help=True)
app.add_typer(users, name="users")
_RUN = typer.Option("runs/demo", help="Run directory (its feedback.db).")
_DB = typer.Option("", help="Database URL; empty: SQLite in the run directory.")


_URL = typer.Option(
    "",
    help="The server's base URL for the link. Empty: the one `rlhfkit serve` last used on "
    "this store (its --public-url, else http://host:port).",
)
_NO_SERVER_YET = "http://127.0.0.1:8000"  # `rlhfkit serve`'s defaults


def _base_url(store, url: str) -> str:
    """The base of invite links: ``--url``, else what the server recorded in the store when it started."""
    if url:
        return url.rstrip("/")
    recorded = store.setting("base_url")
    if recorded:
        return recorded
    typer.echo(
        f"note: no server has run on this store yet; the link assumes {_NO_SERVER_YET} (pass --url to name another)",
        err=True,
    )
    return _NO_SERVER_YET


@users.command("add")
@friendly
def users_add(
    name: str,
    run: str = _RUN,
    db: str = _DB,
    role: str = typer.Option("labeler", help="labeler or admin."),
    url: str = _URL,
):
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
def convert(
    model: str = typer.Argument("smollm2-135m-instruct", help="A model spec (name, .gguf file, directory, hub id)."),
    out: str | None = typer.Option(None, help="Also copy the converted Hugging Face directory here."),
):
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
