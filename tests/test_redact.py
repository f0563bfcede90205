"""Secrets never reach MLflow: credential-named config values and environment variables, and
URI passwords, are masked in params, tags, the run name and the `config.yaml` artifact."""

from __future__ import annotations

import uuid

import pytest
import yaml

from pipeline.config import Config
from pipeline.redact import MASK, looks_secret, redact, redact_text, secret_env_values


@pytest.mark.parametrize("name", ["HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY",
                                  "model.kwargs.api_key", "db-credentials", "OPENAI_APIKEY",
                                  "GITHUB_TOKEN", "tracking.client_secret"])
def test_credential_names_are_secret(name):
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["batching.max_tokens", "batching.token_budget", "train.seed",
                                  "data.sequence_column", "PATH", "keyboard", "monkey_count"])
def test_ordinary_names_are_not(name):
    assert not looks_secret(name)


def test_every_config_key_of_the_project_is_logged_as_is():
    """No false positive among the project's own keys: the whole default config survives."""
    params = Config().flat_params()
    assert redact(params, env_values=[]) == params


def test_a_credential_inside_a_mapping_is_masked_in_the_flat_params():
    """`model.kwargs` is one MLflow param (a string): its `api_key` is masked before."""
    cfg = Config().with_overrides({"model.name": "import:os:getcwd",
                                   "model.kwargs": {"api_key": "sk-live-123", "width": 8}})
    kwargs = cfg.flat_params()["model.kwargs"]
    assert "sk-live-123" not in kwargs and kwargs == str({"api_key": MASK, "width": 8})


def test_a_data_uris_query_credentials_are_masked_in_the_flat_params():
    """Arrow reads S3 keys from the URI's query (`?access_key=..&secret_key=..`)."""
    uri = "s3://bucket/d?access_key=AKIA0&secret_key=wJalr/K7&region=eu-west-1"
    path = redact(Config().with_overrides({"data.path": uri}).flat_params(), env_values=[])["data.path"]
    assert path == f"s3://bucket/d?access_key={MASK}&secret_key={MASK}&region=eu-west-1"


def test_masking_twice_is_masking_once_and_keeps_json_json():
    """The project masks some text twice (a tag, then the run's tags): the second pass changes
    nothing, and a masked JSON document still parses."""
    import json

    doc = json.dumps({"data.path": "s3://AK:pw@b/d?secret_key=X&region=r", "train.seed": 1})
    once = redact_text(doc, [])
    assert redact_text(once, []) == once
    assert json.loads(once) == {"data.path": f"s3://AK:{MASK}@b/d?secret_key={MASK}&region=r",
                                "train.seed": 1}


def test_env_values_are_masked_wherever_they_appear_and_short_ones_are_not_taken():
    env = {"HF_TOKEN": "hf_abcdef123456", "MY_PASSWORD": "pw", "HOME": "/root"}
    values = secret_env_values(env)
    assert values == ["hf_abcdef123456"]
    assert redact_text("run-hf_abcdef123456-x /root", values) == f"run-{MASK}-x /root"


def test_a_config_tree_keeps_its_shape_and_loses_its_secrets():
    tree = {"model": {"kwargs": {"api_key": "k-1", "width": 8, "layers": ["a", "hf_zzzzzzzz"]}},
            "tracking": {"uri": "https://alice:pa55word@mlflow.example.com:5000",
                         "credentials": {"user": "alice", "pass": "x"}}}
    got = redact(tree, env_values=["hf_zzzzzzzz"])
    assert got == {"model": {"kwargs": {"api_key": MASK, "width": 8, "layers": ["a", MASK]}},
                   "tracking": {"uri": f"https://alice:{MASK}@mlflow.example.com:5000",
                                "credentials": MASK}}


@pytest.mark.mlflow
def test_a_run_started_with_secrets_around_has_none_of_them(mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import start_run

    env_secret, cfg_secret, uri_secret = (f"{p}-{uuid.uuid4().hex}" for p in ("env", "cfg", "uri"))
    monkeypatch.setenv("PIPELINE_TEST_SECRET", env_secret)
    params = {**Config().flat_params(), "model.kwargs.api_key": cfg_secret,
              "tracking.uri": f"http://bob:{uri_secret}@127.0.0.1:1/",
              "tracking.run_name": f"name-{env_secret}"}
    tree = {"model": {"kwargs": {"api_key": cfg_secret}},
            "tracking": {"uri": params["tracking.uri"], "run_name": params["tracking.run_name"]}}
    run_id = start_run(mlflow_server, "test-redact", run_name=f"name-{env_secret}", params=params,
                       config_yaml=yaml.safe_dump(tree), tags={"note": f"with {env_secret}"})
    c = MlflowClient(mlflow_server)
    run = c.get_run(run_id)
    import mlflow.artifacts

    mlflow.set_tracking_uri(mlflow_server)
    logged = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    searched = [logged, *run.data.params.values(), *run.data.tags.values()]
    assert not [s for s in searched for secret in (env_secret, cfg_secret, uri_secret)
                if secret in s]
    assert run.data.params["model.kwargs.api_key"] == MASK
    assert run.data.params["tracking.uri"] == f"http://bob:{MASK}@127.0.0.1:1/"
    assert run.data.tags["mlflow.runName"] == f"name-{MASK}"
    assert yaml.safe_load(logged)["model"]["kwargs"]["api_key"] == MASK
    assert run.data.params["train.epochs"] == params["train.epochs"]  # the rest as it was


def test_a_tracking_server_behind_basic_auth_is_reachable_with_the_uris_credentials(monkeypatch):
    """`http://user:password@host` is how MLflow's client (requests) is given basic auth: the
    reachability probe takes it the same way (urllib could not, and called the server away)."""
    import base64
    import http.server
    import threading

    from pipeline.tracking import server_reachable

    want = "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            ok = self.path == "/health" and self.headers.get("Authorization") == want
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert server_reachable(f"http://alice:s3cret-pw@127.0.0.1:{port}")
        assert not server_reachable(f"http://alice:wrong@127.0.0.1:{port}")
        assert not server_reachable(f"http://127.0.0.1:{port}")
        # MLflow's own settings reach the probe as they reach its client (a token here; the
        # TLS ones the same way): a bare request called such a server away, and no run was made
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
        assert server_reachable(f"http://127.0.0.1:{port}")
    finally:
        server.shutdown()
        server.server_close()


def test_the_working_directory_is_not_a_secret(monkeypatch, tmp_path):
    """The shell's `PWD` ends in "pwd" but is a path: masking it turned the store a job prints
    (`sqlite:///<cwd>/mlflow.db`) and every path under it into `***` -- in the console's
    `mlflow ui` line and in the params and config.yaml MLflow keeps. `DB_PWD` stays secret."""
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("OLDPWD", "/home/someone")
    monkeypatch.setenv("DB_PWD", "hunter22")
    assert redact_text(f"sqlite:///{tmp_path}/mlflow.db pw hunter22") == (
        f"sqlite:///{tmp_path}/mlflow.db pw ***")
    assert redact({"data": {"path": f"{tmp_path}/d.parquet"}}) == {
        "data": {"path": f"{tmp_path}/d.parquet"}}


def test_a_refused_set_value_is_echoed_masked(capsys):
    """A `--set` refused as YAML (a key given twice) echoes its value: a credential in it is
    masked in that line (it was printed as typed)."""
    from pipeline import cli

    rc = cli.run(["train", "--set", "model.kwargs={api_key: hunter22, api_key: hunter22}"])
    err = capsys.readouterr().err
    assert rc == 2 and "hunter22" not in err, err
    assert "model.kwargs={api_key: ***, api_key: ***}: duplicate key 'api_key'" in err


@pytest.mark.parametrize(("text", "want"), [
    ("s3://b/d?secretKey=S3CR&accessKey=AK&region=x", "s3://b/d?secretKey=***&accessKey=***&region=x"),
    ("https://a.blob.core.windows.net/c/d?sv=2022-11-02&sr=b&sig=Ab%2Bc",
     "https://a.blob.core.windows.net/c/d?sv=2022-11-02&sr=b&sig=***"),
    ("https://s3.amazonaws.com/b/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=9f8e",
     "https://s3.amazonaws.com/b/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("git clone https://glpat-0123456789abcdefghij@gitlab.com/r.git",
     "git clone https://***@gitlab.com/r.git"),
    ("http://me@host:5000/x", "http://me@host:5000/x"),  # a user name, not a token
])
def test_uri_credentials_in_other_forms_are_masked(text, want):
    assert redact_text(text, []) == want
    assert redact_text(want, []) == want  # (masking twice is masking once)


def test_a_credential_variables_file_path_is_not_masked(monkeypatch, tmp_path):
    """GOOGLE_APPLICATION_CREDENTIALS names a key file: masking its path wherever it appears
    hid the culprit of an error about that file. A value that is not an existing path is."""
    key = tmp_path / "key.json"
    key.write_text("{}")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("SERVICE_CREDENTIALS", "not-a-path-but-a-secret")
    assert redact_text(f"cannot read {key}; not-a-path-but-a-secret") == f"cannot read {key}; ***"


@pytest.mark.parametrize("text", [
    "/data/key=2024-01-01/part-0.parquet",  # a Hive partition: the path as given
    "s3://b/t/token=abcdefgh/p.parquet",
    "File x.py, in f: sorted(rows, key=len)",  # a traceback's keyword argument
    "mysql://db_admin_user_account_x@db:3306/m",  # a long user name, not a token
    '{"p": "s3://b/d", "key": "digits"}',  # JSON of a config: kept valid, nothing secret
])
def test_text_that_only_looks_like_a_credential_is_kept(text):
    assert redact_text(text, []) == text
