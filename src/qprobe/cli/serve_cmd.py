"""`qprobe serve`: the Q-probe policy as an OpenAI-compatible server (qprobe.serve)."""

from __future__ import annotations

import sys
from typing import Any

import click


@click.command("serve")
@click.option("--probe", "probe_path", required=True,
              help="A trained probe directory, hf://ORG/NAME[@REVISION] from the Hub, or a shipped probe (default-code).")
@click.option("--backend", default=None, help="Back-end that generates (default: the one the probe's features came from).")
@click.option("--model", default=None, help="Model (default: the back-end's default; must match the probe's weights).")
@click.option("--backend-option", multiple=True, metavar="KEY=VALUE", help="Back-end option, e.g. n_threads=2.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, help="Port to listen on.")
@click.option("--api-key", default=None, envvar="QPROBE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (also $QPROBE_API_KEY). Default: no key.")
@click.option("--queue", "queue_size", default=64, show_default=True,
              help="Requests that may wait for the back-end; more get a 429 with Retry-After.")
@click.option("-k", "k", type=int, default=None, help="Default samples per pick (default: the k the probe was validated with).")
@click.option("--beta", type=float, default=None, help="Default selection temperature (default: the probe's; 0 = argmax).")
@click.option("--max-tokens", type=int, default=None, help="Default most tokens per sample (default 300).")
@click.option("--max-samples", default=64, show_default=True, help="Most samples (n x k) one request may ask for.")
@click.option("--consensus", default=0.0, show_default=True,
              help="Add this weight x the candidate's mean token-set similarity to the other candidates to Q (0 = off).")
@click.option("--served-name", default=None, help="The model id the server answers as (default: the --probe as given).")
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
def serve_cmd(probe_path, backend, model, backend_option, host, port, api_key, queue_size, k, beta, max_tokens,
              max_samples, consensus, served_name, access_log):
    """Serve the Q-probe policy over HTTP: POST /v1/chat/completions and /v1/completions answer with the
    probe's pick among k samples (the openai client works as is); GET /v1/models, GET /health.
    A request's k, beta and return_candidates go in its "qprobe" object; what it leaves out comes
    from the probe's card (k and beta it was validated with, the stop sequences of its task) or the
    options below. See GET /v1/models for the defaults in force.

    \b
      qprobe serve --probe default-code --port 8000
      client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
      client.chat.completions.create(model="default-code", messages=[...], seed=0,
          extra_body={"qprobe": {"k": 8, "beta": 0.1, "return_candidates": True}})
    """
    from qprobe.catalog import BACKENDS
    from qprobe.cli.options import generator_name, parse_kv
    from qprobe.errors import ConfigError, require
    from qprobe.probes.models import Probe
    from qprobe.serve.protocol import defaults_from_probe

    require("uvicorn", "serve")
    require("starlette", "serve")
    if not 0 <= port <= 65535:
        raise ConfigError(f"expected --port in 0..65535, got {port}")
    probe = Probe.from_pretrained(probe_path)
    if getattr(probe, "feature_spec_", None) is None:
        raise ConfigError(f"expected a probe with a feature spec in {probe_path}, got none; train it with `qprobe train --run`")
    name = generator_name(probe, probe_path, backend)
    if name not in BACKENDS:
        BACKENDS.entry(name)  # "did you mean" error for a mistyped --backend
    options = parse_kv(backend_option, "--backend-option")
    if model is not None:
        options["model"] = model
    defaults = defaults_from_probe(probe, k=k, beta=beta, max_tokens=max_tokens, max_samples=max_samples)
    with BACKENDS.create(name, **options) as be:
        _run(be, probe, probe_path, defaults, host=host, port=port, api_key=api_key, queue_size=queue_size,
             consensus=consensus, served_name=served_name, access_log=access_log)


def _run(be: Any, probe: Any, probe_path: str, defaults: Any, *, host: str, port: int, api_key: str | None,
         queue_size: int, consensus: float, served_name: str | None, access_log: bool) -> None:
    import uvicorn

    from qprobe.serve.app import ServeInfo, make_app
    from qprobe.serve.engine import Engine

    engine = Engine(be, probe, consensus=consensus, queue_size=queue_size)
    engine.warm_up()  # a probe that does not fit the back-end's features fails here, in one line
    about = {"probe": str(probe_path), "backend": be.name, "identity": be.identity(), "consensus": consensus}
    info = ServeInfo(model_id=served_name or str(probe_path), defaults=defaults, api_key=api_key, about=about)
    click.echo(f"qprobe serve: {info.model_id} on http://{host}:{port}/v1 (back-end {be.name}, k = {defaults.k}, "
               f"beta = {defaults.beta:g}, queue {queue_size}{', API key required' if api_key else ''})", err=True)
    sys.stderr.flush()
    uvicorn.run(make_app(engine, info), host=host, port=port, log_level="info", access_log=access_log)
