"""The `qprobe` command. Subcommands live in their own modules and are imported on use."""

from __future__ import annotations

import importlib
import sys

import click

from qprobe.errors import QProbeError

# name -> "module:attribute" of a click command; one line per capability.
COMMANDS = {
    "collect": "qprobe.cli.run_cmds:collect_cmd",
    "copy": "qprobe.cli.run_cmds:copy_cmd",
    "credits": "qprobe.cli.credits_cmd:credits_cmd",
    "demo": "qprobe.cli.demo:demo",
    "embed": "qprobe.cli.run_cmds:embed",
    "eval": "qprobe.cli.eval_cmds:eval_cmd",
    "export": "qprobe.cli.run_cmds:export",
    "inspect": "qprobe.cli.run_cmds:inspect_run",
    "iterate": "qprobe.cli.learn_cmds:iterate_cmd",
    "ls": "qprobe.cli.run_cmds:ls",
    "pairs": "qprobe.cli.pairs_cmds:pairs",
    "report": "qprobe.cli.report_cmd:report_cmd",
    "rl": "qprobe.cli.learn_cmds:rl_cmd",
    "rm": "qprobe.cli.rm_cmds:rm",
    "select": "qprobe.cli.eval_cmds:select_cmd",
    "serve": "qprobe.cli.serve_cmd:serve_cmd",
    "train": "qprobe.cli.train:train",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when invoked (keeps `--help` fast)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qprobe")
@click.option("--verbose", is_flag=True, help="Also print the model libraries' own log (llama.cpp's warnings); same as QPROBE_VERBOSE=1.")
def cli(verbose: bool) -> None:
    """Q-probing: sample k completions, score each with a linear probe on the model's own
    hidden states, keep the best. Typical flow:

    \b
      qprobe collect --task mbpp --split train --n 16 --out runs/mbpp-train --allow-code-execution
      qprobe train --run runs/mbpp-train --loss pg --out probes/pg
      qprobe eval ...        qprobe select --probe probes/pg --prompt "..."
    """
    if verbose:
        import os

        os.environ["QPROBE_VERBOSE"] = "1"


def main(argv: list[str] | None = None) -> None:
    """Entry point: QProbeError becomes one line on stderr and exit code 2, no traceback."""
    try:
        cli.main(args=argv, prog_name="qprobe", standalone_mode=False)
    except QProbeError as exc:
        click.echo(f"qprobe: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("qprobe: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
