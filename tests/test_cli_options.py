"""The machinery the command-line tools share: broker connection options, FloraError and its exit statuses."""

from __future__ import annotations

import pytest

from flora.broker import cli as aggregator_cli
from flora.edge import cli as agent_cli
from flora.edge.config import ConfigError
from flora.edge.errors import EXIT_BAD_INPUT, EXIT_QUORUM, EXIT_UNAVAILABLE, FloraError
from flora.edge.mqtt import BrokerConfig, BrokerConfigError

CONNECTION = ["--broker", "mqtts://broker.example:8884", "--username", "dev-1", "--password", "pw",
              "--tls-ca", "{ca}", "--session-expiry-s", "120"]


def _parsed(command, argv):
    parser = agent_cli.build_parser() if command != "aggregator" else aggregator_cli.build_parser()[0]
    return parser.parse_args([command if command != "aggregator" else "run", *argv])


def test_every_tool_that_connects_reads_the_same_broker_options(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here")
    argv = [a.format(ca=ca) for a in CONNECTION]
    agent = BrokerConfig.from_args(_parsed("run", argv))
    aggregator = BrokerConfig.from_args(_parsed("aggregator", argv))
    assert agent == aggregator == BrokerConfig("broker.example", 8884, True, "dev-1", "pw", str(ca), None, None,
                                               30, 120)
    doctor = BrokerConfig.from_args(_parsed("doctor", argv[:-2]), session_expiry_s=0)  # a probe: no session
    assert doctor == BrokerConfig("broker.example", 8884, True, "dev-1", "pw", str(ca), None, None, 30, 0)
    with pytest.raises(SystemExit):  # the doctor leaves no session behind, so it has no such option
        _parsed("doctor", argv)


@pytest.mark.parametrize("argv, message", [
    ([], "missing --broker"),
    (["--broker", "ftp://h"], "must start with mqtt:// or mqtts://"),
    (["--broker", "mqtt://h", "--tls-ca", "/nonexistent/ca.crt"], "TLS CA file /nonexistent/ca.crt does not exist"),
    (["--broker", "mqtt://h", "--tls-cert", "{ca}"], "a TLS client certificate needs its key"),
    (["--broker", "mqtt://h", "--session-expiry-s", "-1"], "session expiry must be >= 0"),
])
def test_unusable_connection_options_are_refused_with_the_reason(argv, message, tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    argv = [a.format(ca=tmp_path / "ca.crt") for a in argv]
    for command in ("run", "aggregator"):
        with pytest.raises(BrokerConfigError, match=message):
            BrokerConfig.from_args(_parsed(command, argv))


# -- errors: FloraError and its exit codes; anything else is a bug and shows as one ------------------
def test_the_aggregator_exits_with_each_errors_own_status_and_lets_bugs_through(tmp_path, monkeypatch, capsys):
    from flora.broker import aggregator
    from flora.broker.checkpoint import CheckpointError
    from flora.broker.rounds import QuorumError
    from flora.edge.synthetic import synthetic_manifest, write_bundle

    monkeypatch.setattr(aggregator_cli.signal, "signal", lambda *args: None)  # keep pytest's SIGINT handler
    bundle = write_bundle(tmp_path / "bundle", synthetic_manifest())
    argv = ["--bundle", str(bundle), "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s")]
    for error, code in ((CheckpointError("disk"), 3), (QuorumError("quorum"), 4), (ConnectionError("net"), 3)):
        monkeypatch.setattr(aggregator.Aggregator, "run", lambda self, e=error: (_ for _ in ()).throw(e))
        assert aggregator_cli.main(argv) == code
        assert capsys.readouterr().err.endswith(f"flora-aggregator: error: {error}\n")
    monkeypatch.setattr(aggregator.Aggregator, "run", lambda self: {}["a programming error"])
    with pytest.raises(KeyError):
        aggregator_cli.main(argv)
    monkeypatch.setattr(aggregator_cli, "_load_inputs", lambda args: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):  # not "bad arguments": a traceback
        aggregator_cli.main(argv)


def test_every_error_class_is_a_flora_error_with_the_documented_status():
    from flora.broker.checkpoint import CheckpointError
    from flora.broker.mosquitto import MosquittoError
    from flora.broker.rounds import QuorumError
    from flora.edge.adapter import AdapterError
    from flora.edge.bundle import BundleError
    from flora.edge.dataset import DatasetError
    from flora.edge.mqtt import ConnectionFailed, NotAuthorised
    from flora.edge.preprocess import ImageError
    from flora.edge.protocol import ProtocolError
    from flora.edge.state import StateError
    from flora.edge.trainers import TrainerError

    for cls in (ConfigError, BundleError, DatasetError, BrokerConfigError, StateError, TrainerError, AdapterError,
                ProtocolError, ImageError, NotAuthorised):
        assert issubclass(cls, FloraError) and cls.exit_code == EXIT_BAD_INPUT, cls
    for cls in (CheckpointError, MosquittoError, ConnectionFailed):
        assert issubclass(cls, FloraError) and cls.exit_code == EXIT_UNAVAILABLE, cls
    assert issubclass(QuorumError, FloraError) and QuorumError.exit_code == EXIT_QUORUM == 4
    assert (EXIT_BAD_INPUT, EXIT_UNAVAILABLE) == (2, 3)
    assert issubclass(ConnectionFailed, ConnectionError) and issubclass(NotAuthorised, ConnectionError)
