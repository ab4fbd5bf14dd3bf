"""Settings are normalised once and compared like with like: environment values (``openllm_ds.settings``) and paths
(``openllm_ds.paths``), on both sides of every check that compares a setting with another."""

from __future__ import annotations

import dataclasses
import http.client
import os
from pathlib import Path

import pytest

from openllm_ds.config import load_run_config
from openllm_ds.errors import UserError
from openllm_ds.paths import is_within, normal_path, same_path
from openllm_ds.settings import (api_key_setting, env_flag, env_int, env_setting, host_setting, is_loopback,
                                 ray_address)


def test_environment_values_are_stripped_and_blank_is_unset(monkeypatch):
    monkeypatch.setenv("OPENLLM_PROBE", "  value \n")
    assert env_setting("OPENLLM_PROBE") == "value"
    monkeypatch.setenv("OPENLLM_PROBE", " \t ")
    assert env_setting("OPENLLM_PROBE") is None
    monkeypatch.delenv("OPENLLM_PROBE")
    assert env_setting("OPENLLM_PROBE") is None
    for value, on in (("1", True), (" TRUE ", True), ("Yes", True), ("on\n", True), ("0", False), ("off", False),
                      ("", False)):
        monkeypatch.setenv("OPENLLM_PROBE", value)
        assert env_flag("OPENLLM_PROBE") is on, value
    monkeypatch.setenv("OPENLLM_PROBE", " 4 ")
    assert env_int("OPENLLM_PROBE", 1) == 4
    monkeypatch.setenv("OPENLLM_PROBE", "four")
    with pytest.raises(UserError, match=r"environment variable OPENLLM_PROBE='four' is not an integer"):
        env_int("OPENLLM_PROBE", 1)


@pytest.mark.parametrize("flag,env,want", [
    (None, None, None), (None, "", None), (None, "   ", None), (None, "local", None), (None, " LOCAL ", None),
    (None, "auto", "auto"), (None, " Auto\n", "auto"), (None, "ray://head:10001 ", "ray://head:10001"),
    (None, "http://127.0.0.1:8265", "http://127.0.0.1:8265"), ("head:6379", "other:1", "head:6379"),
    (" ", "head:6379", None), ("local", "head:6379", None),
])
def test_ray_address_has_one_normal_form(monkeypatch, flag, env, want):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert ray_address(flag) == want


@pytest.mark.parametrize("host,normal,loopback", [
    ("127.0.0.1", "127.0.0.1", True), (" 127.0.0.1 ", "127.0.0.1", True), ("127.0.1.1", "127.0.1.1", True),
    ("localhost", "localhost", True), ("LocalHost", "LocalHost", True), ("::1", "::1", True), ("[::1]", "::1", True),
    ("0.0.0.0", "0.0.0.0", False), ("::", "::", False), ("10.0.0.5", "10.0.0.5", False),
    ("example.com", "example.com", False),
])
def test_hosts_compare_as_addresses(host, normal, loopback):
    assert host_setting(host) == normal and is_loopback(host_setting(host)) is loopback


def test_the_api_key_is_compared_as_the_bearer_token_is(monkeypatch, small_run):
    monkeypatch.setenv("OPENLLM_API_KEY", "  s3cret\n")
    assert api_key_setting(None) == "s3cret"
    assert api_key_setting(" other ") == "other"  # the flag wins
    for bad, message in (("", r"^OPENLLM_API_KEY is empty"), ("   ", r"^OPENLLM_API_KEY is empty"),
                         ("clé", r"^OPENLLM_API_KEY holds characters an HTTP Authorization header cannot carry"),
                         ("two words", r"cannot carry")):
        monkeypatch.setenv("OPENLLM_API_KEY", bad)
        with pytest.raises(UserError, match=message):
            api_key_setting(None)

    from openllm_ds.inference import load_completer
    from openllm_ds.serve import start_server

    completer = load_completer(small_run, context_length=32, model_name="m", max_concurrency=1)
    try:
        with start_server(completer=completer, api_key=" s3cret\n") as srv:
            for header, status in (("Bearer s3cret", 200), ("Bearer  s3cret ", 200), ("bearer s3cret", 200),
                                   ("Bearer s3cret\t", 200), ("Bearer wrong", 401), ("Bearer", 401)):
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
                conn.request("GET", "/v1/models", headers={"Authorization": header})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                assert resp.status == status, header
    finally:
        completer.close()


def test_paths_compare_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("x")
    (tmp_path / "link").symlink_to("data")
    os.link(tmp_path / "data" / "x.txt", tmp_path / "hard.txt")
    (tmp_path / "other.txt").write_text("x")
    spellings = ["data/x.txt", "./data/x.txt", str(tmp_path / "data/x.txt"), "~/data/x.txt", "data/../data/x.txt",
                 "link/x.txt", "hard.txt"]
    assert all(same_path(a, b) for a in spellings for b in spellings)
    assert not same_path("data/x.txt", "other.txt") and not same_path("data/x.txt", "data/missing.txt")
    assert normal_path("data/") == normal_path("data") == normal_path("~/link") == tmp_path / "data"
    assert is_within("link/x.txt", "data") and is_within("~/data", "./data/") and not is_within("data", "data/x.txt")


def test_config_paths_have_home_expanded_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  tokenizer_dir: ~/tok\n  data_files: [~/a.txt, ~/b.txt]\n")
    cfg = load_run_config(yaml_file, {"train.output_dir": "~/runs/x", "train.init_from": "~/hf"})
    t = cfg.train
    assert (t.tokenizer_dir, t.output_dir, t.init_from) == (f"{tmp_path}/tok", f"{tmp_path}/runs/x", f"{tmp_path}/hf")
    assert t.data_files == (f"{tmp_path}/a.txt", f"{tmp_path}/b.txt")
    assert cfg.train.resume == "auto" and load_run_config(None, {"train.data_file": "hf:org/set"}).train.data_file \
        == "hf:org/set"


def test_a_run_compares_its_saved_settings_in_one_normal_form(tmp_path, monkeypatch):
    """The pipeline continues a finished run only when its settings did not change: the same paths spelled another
    way (relative, absolute, trailing slash, a symlink, ~) are no change."""
    from openllm_ds.pipeline import uses_prepare
    from openllm_ds.train.ray_launcher import absolute_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "tok").mkdir()
    (tmp_path / "alias").symlink_to("corpus")
    base = {"train.tokenizer_dir": "tok", "train.output_dir": "models/x"}
    spellings = [{"train.data_file": "corpus"}, {"train.data_file": "./corpus/", "train.tokenizer_dir": "./tok/"},
                 {"train.data_file": str(tmp_path / "corpus"), "train.output_dir": str(tmp_path / "models/x/")},
                 {"train.data_file": "alias", "train.output_dir": "~/models/x"}]
    trains = [dataclasses.asdict(absolute_paths(load_run_config(None, {**base, **s})).train) for s in spellings]
    assert all(t == trains[0] for t in trains)
    assert uses_prepare(load_run_config(None, {"train.data_file": "./data/clean/training_data.txt"}))
    assert uses_prepare(load_run_config(None, {"train.data_file": str(tmp_path / "data/clean/training_data.txt")}))


def test_an_export_into_its_own_model_by_another_path_is_refused(tmp_path, monkeypatch):
    from openllm_ds.export.common import check_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/run").mkdir(parents=True)
    (tmp_path / "alias").symlink_to("models/run")
    for out in ("alias", "./models/run/", str(tmp_path / "models"), "alias/.."):
        with pytest.raises(UserError, match="would replace the model being exported"):
            check_output_dir(Path(out), Path("models/run"), overwrite=True, fmt="huggingface")


def test_a_ray_job_takes_an_output_under_home(monkeypatch):
    from openllm_ds.utils import check_job_outputs

    monkeypatch.setattr(Path, "cwd", classmethod(lambda cls: Path("/tmp/ray/runtime_resources/working_dir_files/p")))
    check_job_outputs({"--output_dir": "~/models/x"})  # absolute once ~ is expanded
    with pytest.raises(UserError, match="a Ray job runs in a temporary copy"):
        check_job_outputs({"--output_dir": "models/x"})
