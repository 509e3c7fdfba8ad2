"""Tier 1: one settings object, overridable by environment, with security settings parsed."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from pymk.settings import Settings, settings_env_names
from pymk.streams.app import faust_credentials


def test_defaults_follow_the_contract() -> None:
    s = Settings.from_env({})
    assert s.topic("connections") == "pymk.connections"
    assert s.partitions == 8
    assert s.web_host == "127.0.0.1"
    assert set(s.input_topics.values()) == {
        "pymk.connections", "pymk.profile-views", "pymk.dismissals", "pymk.engagements", "pymk.users"}


def test_every_field_is_overridable_by_environment() -> None:
    env = {"PYMK_PARTITIONS": "16", "PYMK_TOPIC_PREFIX": "acme", "PYMK_HOME": "/tmp/x", "PYMK_KAFKA_PORT": "19092"}
    s = Settings.from_env(env)
    assert (s.partitions, s.topic("users"), s.home, s.bootstrap) == (16, "acme.users", Path("/tmp/x"),
                                                                      "127.0.0.1:19092")
    assert Settings.from_env(s.as_env()) == s
    assert len(settings_env_names()) == len(s.as_env())


def test_bad_environment_value_is_reported() -> None:
    with pytest.raises(ValueError, match="PYMK_PARTITIONS"):
        Settings.from_env({"PYMK_PARTITIONS": "eight"})


@pytest.mark.parametrize("name, choices", [("refresh_scope", ("touched", "two-hop")),
                                           ("ranker_kind", ("xgboost", "two-tower", "blend")),
                                           ("reranker", ("none", "cross-attention")),
                                           ("ann_space", ("sage", "two-tower")),
                                           ("ann_quantization", ("flat", "sq8")),
                                           ("tree_evaluator", ("auto", "xgboost"))])
def test_enumerated_settings_refuse_what_is_not_a_choice(name: str, choices: tuple[str, ...]) -> None:
    variable = "PYMK_" + name.upper()
    for choice in choices:
        assert getattr(Settings.from_env({variable: choice}), name) == choice
    typo = choices[-1].replace("-", "_").upper()  # "TWO_HOP": a typo that used to pass as the default
    with pytest.raises(ValueError, match=f"{variable}='{typo}' is not one of {', '.join(choices)}"):
        Settings.from_env({variable: typo})
    with pytest.raises(ValueError, match=variable):
        Settings(**{name: typo})  # type: ignore[arg-type]


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().partitions = 3  # type: ignore[misc]


def test_sasl_ssl_client_config_and_redaction(tmp_path: Path) -> None:
    env = {"PYMK_SECURITY_PROTOCOL": "SASL_SSL", "PYMK_SASL_MECHANISM": "SCRAM-SHA-512",
           "PYMK_SASL_USERNAME": "pymk", "PYMK_SASL_PASSWORD": "hunter2",
           "PYMK_BOOTSTRAP_SERVERS": "k1:9093,k2:9093"}
    s = Settings.from_env(env)
    config = s.kafka_client_config()
    assert config["bootstrap_servers"] == "k1:9093,k2:9093"
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "pymk" and config["sasl_plain_password"] == "hunter2"
    # Secrets never show in repr or in the redacted form used for logs.
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.redacted())
    creds = faust_credentials(s)
    assert creds.username == "pymk" and creds.mechanism.value == "SCRAM-SHA-512"
    assert isinstance(creds.ssl_context, ssl.SSLContext)


def test_plaintext_has_no_credentials() -> None:
    assert faust_credentials(Settings()) is None
    assert "sasl_mechanism" not in Settings().kafka_client_config()


def test_unknown_security_protocol_is_rejected() -> None:
    with pytest.raises(ValueError, match="security protocol"):
        faust_credentials(Settings(security_protocol="CARRIER_PIGEON"))


def test_debug_http_binds_loopback_by_default(tmp_path: Path) -> None:
    from pymk.streams.app import PymkApp

    app = PymkApp(Settings(home=tmp_path)).app
    assert app.conf.web_bind == "127.0.0.1"
